"""The GCS emulator of the gs:// tests: gcp-storage-emulator, with the generation headers that
GCS sends with every object download and the emulator leaves out (tensorstore, which writes
orbax's arrays, reads them to make its conditional updates of a checkpoint's manifest).

  python -m tests.train.gcs_emulator start --host 127.0.0.1 --port N --in-memory …
"""

from __future__ import annotations

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]
  except Exception:  # a missing object: the emulator's own handler answers 404
    pass
  return _download(request, response, storage, *args, **kwargs)


if __name__ == "__main__":
  objects.download = _download_with_generation  # before the server's routes take it
  from gcp_storage_emulator import __main__ as emulator
  sys.exit(emulator.main())
