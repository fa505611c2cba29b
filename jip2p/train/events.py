"""TensorBoard event files written directly: scalars and PNG images, no TensorFlow, no PyTorch.

Why not tensorboardX: it imports torch whenever torch is installed, and the trainer may hold
TensorFlow (the tf.data reader); the two must never share a process. An event file is a TFRecord
stream of ``Event`` protocol buffers, and the few fields needed here are encoded by hand:

  Event   {1: wall_time double, 2: step int64, 3: file_version string, 5: summary Summary}
  Summary {1: repeated Value {1: tag string, 2: simple_value float, 4: image Image}}
  Image   {1: height int32, 2: width int32, 3: colorspace int32, 4: encoded_image_string bytes}

Local files are appended to and flushed; on object stores (``gs://…``), which cannot append, each
flush writes the events gathered since the last one as a new file in the same directory, which
TensorBoard reads as one run.
"""

from __future__ import annotations

import io
import socket
import struct
import time

import numpy as np
from etils import epath
from PIL import Image


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  table = _TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  crc = crc32c(data)
  return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return length + _masked_crc(length) + data + _masked_crc(data)


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1
  out = bytearray()
  while True:
    bits, n = n & 0x7F, n >> 7
    out.append(bits | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint(number << 3 | wire_type) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def _event(step: int, *, summary_values: list[bytes] = (), file_version: str | None = None,
           wall_time: float | None = None) -> bytes:
  out = _field(1, 1, struct.pack("<d", time.time() if wall_time is None else wall_time))
  out += _field(2, 0, _varint(step))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if summary_values:
    out += _bytes_field(5, b"".join(_bytes_field(1, v) for v in summary_values))
  return out


def scalar_value(tag: str, value: float) -> bytes:
  return _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(value)))


def image_value(tag: str, image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] → a PNG image summary."""
  image = np.asarray(image, np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  h, w, c = image.shape
  encoded = (_field(1, 0, _varint(h)) + _field(2, 0, _varint(w)) + _field(3, 0, _varint(c))
             + _bytes_field(4, buffer.getvalue()))
  return _bytes_field(1, tag.encode()) + _bytes_field(4, encoded)


class EventWriter:
  """Appends events to ``<logdir>/events.out.tfevents.<time>.<host>[.<n>]``."""

  def __init__(self, logdir: str):
    self.logdir = epath.Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    self._remote = "://" in str(logdir)
    self._name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self._pending: list[bytes] = [tfrecord(_event(0, file_version="brain.Event:2"))]
    self._parts = 0
    self._file = None if self._remote else (self.logdir / self._name).open("ab")

  def write(self, step: int, values: list[bytes]) -> None:
    self._pending.append(tfrecord(_event(step, summary_values=values)))

  def flush(self) -> None:
    if not self._pending:
      return
    data = b"".join(self._pending)
    self._pending = []
    if self._file is not None:
      self._file.write(data)
      self._file.flush()
      return
    with (self.logdir / f"{self._name}.{self._parts}").open("wb") as f:
      f.write(data)
    self._parts += 1

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None
