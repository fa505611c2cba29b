"""A stand-in sidecar speaking the protocol without torch, misbehaving on purpose.

Scores are a pure function of the request (sim_0 = mean of images0 / 255 per pair, the others
fixed), so a test can check which request a reply belongs to.

  --mode duplicate: answers every request twice.
  --mode crash:     exits without answering on every request.
  Captions0[0] == "fail" makes that request answer with an ``error`` message.
"""

import argparse
import os
import sys

import numpy as np

from jip2p.sidecar import protocol


def fake_scores(images0: np.ndarray) -> dict[str, np.ndarray]:
  mean = images0.reshape(len(images0), -1).mean(axis=1).astype(np.float32) / 255
  return {"sim_0": mean, "sim_1": mean + 1, "sim_direction": mean + 2, "sim_image": mean + 3}


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--mode", default="duplicate", choices=("duplicate", "crash"))
  args, _ = parser.parse_known_args()
  replies = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)
  protocol.write_message(replies, {"type": "ready", "version": protocol.VERSION, "model": "fake",
                                   "image_size": [8, 8], "pid": os.getpid()})
  while (message := protocol.read_message(sys.stdin.buffer)) is not None:
    header, arrays = message
    if header["type"] == "shutdown":
      return 0
    if args.mode == "crash":
      return 3
    if header["captions0"][0] == "fail":
      protocol.write_message(replies, {"type": "error", "id": header["id"],
                                       "message": "on purpose"})
      continue
    for _ in range(2):
      protocol.write_message(replies, {"type": "result", "id": header["id"]},
                             fake_scores(arrays["images0"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
