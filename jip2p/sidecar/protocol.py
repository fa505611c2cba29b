"""The wire format between the CLIP sidecar and its client. Imports neither torch nor TensorFlow.

Transport: the sidecar is a child process; requests go down its stdin, replies come up its stdout
(the server moves everything else that would print to stdout over to stderr). Both are binary
pipes carrying a stream of frames:

  magic        4 bytes   b"JPCS"
  header_len   uint32    big-endian, at most 16 MiB
  payload_len  uint64    big-endian
  header       UTF-8 JSON object, header_len bytes
  payload      the arrays named in ``header["arrays"]``, each raw C-order bytes, concatenated

``header["arrays"]`` lists ``[name, dtype, shape]`` triples in payload order; dtype is one of
`DTYPES`. Everything else in the header is message fields.

Messages (``header["type"]``):

  sidecar → client, exactly once, first:
    ``ready``  {version, model, image_size [h, w], embed_dim, context_length, precision (CLIP's;
                null without CLIP), dino ({model, image_size, embed_dim} or null), device, pid}
    ``fatal``  {message}: the model could not be loaded; the sidecar then exits with status 2.
  client → sidecar:
    ``score``          {id, captions0, captions1}; arrays images0, images1: uint8 [N, H, W, 3]
                       (0..255) or float32 (0..1), any H, W.
    ``encode_images``  {id}; array images as above.
    ``encode_texts``   {id, texts}.
    ``encode_dino``    {id}; array images as above: DINO features.
    ``shutdown``       {}: the sidecar exits after the request it is working on.
  sidecar → client, one per request, in request order:
    ``result``  {id}; arrays sim_0, sim_1, sim_direction, sim_image float32 [N] (score) or
                features float32 [N, D], L2-normalised (encode_*).
    ``error``   {id, message}: that request failed; the sidecar goes on with the next one.

Versioning: ``ready`` carries `VERSION`; a client refuses a sidecar that speaks another one, so a
stale install fails at start-up with a message instead of garbling replies. Request ids are the
client's own integers; the sidecar echoes them and keeps no other state between requests, which
is what lets the client resend unanswered requests to a fresh sidecar.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import BinaryIO

import numpy as np

from jip2p.errors import Jip2pError

VERSION = 2  # 2: DINO (encode_dino, ready's dino), CLIP optional
MAGIC = b"JPCS"
DTYPES = ("uint8", "float32")
SCORE_KEYS = ("sim_0", "sim_1", "sim_direction", "sim_image")
MAX_HEADER_BYTES = 16 << 20

_PREFIX = struct.Struct(">4sIQ")


class ProtocolError(Jip2pError):
  """A frame on the pipe is malformed or cut short (the peer died mid-write or is not a sidecar)."""


def write_message(stream: BinaryIO, header: Mapping, arrays: Mapping[str, np.ndarray] | None = None
                  ) -> None:
  """Writes one frame and flushes. The arrays are written without an intermediate copy."""
  arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
  for name, a in arrays.items():
    if a.dtype.name not in DTYPES:
      raise ProtocolError(f"array {name!r} has dtype {a.dtype.name}; the protocol carries {DTYPES}")
  meta = [[name, a.dtype.name, list(a.shape)] for name, a in arrays.items()]
  head = json.dumps({**header, "arrays": meta}).encode()
  if len(head) > MAX_HEADER_BYTES:
    raise ProtocolError(f"message header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
  stream.write(_PREFIX.pack(MAGIC, len(head), sum(a.nbytes for a in arrays.values())))
  stream.write(head)
  for a in arrays.values():
    stream.write(memoryview(a.reshape(-1)).cast("B"))
  stream.flush()


def read_message(stream: BinaryIO) -> tuple[dict, dict[str, np.ndarray]] | None:
  """Reads one frame: (header fields, arrays), or None at a clean end of stream.

  The arrays are read-only views of the payload. Raises `ProtocolError` on a garbled or
  truncated frame.
  """
  prefix = stream.read(_PREFIX.size)
  if not prefix:
    return None
  if len(prefix) < _PREFIX.size:
    raise ProtocolError("stream ended inside a frame prefix")
  magic, head_len, payload_len = _PREFIX.unpack(prefix)
  if magic != MAGIC:
    raise ProtocolError(f"bad frame magic {magic!r} (expected {MAGIC!r})")
  if head_len > MAX_HEADER_BYTES:
    raise ProtocolError(f"frame header of {head_len} bytes exceeds {MAX_HEADER_BYTES}")
  head = _read_exactly(stream, head_len)
  try:
    header = json.loads(head)
  except ValueError as e:
    raise ProtocolError(f"frame header is not JSON: {e}") from None
  if not isinstance(header, dict) or not isinstance(header.get("type"), str):
    raise ProtocolError("frame header is not an object with a 'type'")
  meta = header.pop("arrays", [])
  sizes = []
  for name, dtype, shape in meta:
    if dtype not in DTYPES:
      raise ProtocolError(f"array {name!r} has dtype {dtype}; the protocol carries {DTYPES}")
    sizes.append(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
  if sum(sizes) != payload_len:
    raise ProtocolError(f"payload of {payload_len} bytes does not hold the arrays {meta}")
  payload = _read_exactly(stream, payload_len)
  arrays, offset = {}, 0
  for (name, dtype, shape), size in zip(meta, sizes):
    arrays[name] = np.frombuffer(payload, dtype, size // np.dtype(dtype).itemsize,
                                 offset).reshape(shape)
    offset += size
  return header, arrays


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
  data = stream.read(n)
  if len(data) != n:
    raise ProtocolError(f"stream ended after {len(data)} of {n} bytes of a frame")
  return data
