"""The sidecar wire format: round trips, and the frames a dying peer leaves behind."""

import io

import numpy as np
import pytest

from jip2p.sidecar import protocol


def frame(header, arrays=None) -> bytes:
  buf = io.BytesIO()
  protocol.write_message(buf, header, arrays)
  return buf.getvalue()


def test_round_trip_of_several_frames():
  images = np.arange(2 * 5 * 4 * 3, dtype=np.uint8).reshape(2, 5, 4, 3)
  scores = np.linspace(-1, 1, 7, dtype=np.float32)
  stream = io.BytesIO(frame({"type": "score", "id": 3, "captions0": ["ü", ""]},
                            {"images0": images[:, ::2], "sim": scores})
                      + frame({"type": "shutdown"}))
  header, arrays = protocol.read_message(stream)
  assert header == {"type": "score", "id": 3, "captions0": ["ü", ""]}
  np.testing.assert_array_equal(arrays["images0"], images[:, ::2])  # strided input written dense
  np.testing.assert_array_equal(arrays["sim"], scores)
  assert arrays["sim"].dtype == np.float32
  assert protocol.read_message(stream) == ({"type": "shutdown"}, {})
  assert protocol.read_message(stream) is None


@pytest.mark.parametrize("cut", [3, 20, -1])
def test_truncated_frame(cut):
  data = frame({"type": "result", "id": 1}, {"sim": np.ones(4, np.float32)})
  with pytest.raises(protocol.ProtocolError, match="stream ended"):
    protocol.read_message(io.BytesIO(data[:cut]))


def test_garbage_and_unsupported_dtypes():
  with pytest.raises(protocol.ProtocolError, match="magic"):
    protocol.read_message(io.BytesIO(b"Traceback (most recent call last)\n" * 2))
  with pytest.raises(protocol.ProtocolError, match="dtype"):
    frame({"type": "x"}, {"a": np.zeros(2, np.int64)})
  bad = frame({"type": "x"}, {"a": np.zeros(2, np.uint8)}).replace(b'"uint8"', b'"object"')
  bad = bad[:4] + (int.from_bytes(bad[4:8], "big") + 1).to_bytes(4, "big") + bad[8:]
  with pytest.raises(protocol.ProtocolError, match="dtype"):
    protocol.read_message(io.BytesIO(bad))
