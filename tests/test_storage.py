"""storage: the folder upload that writes its index file last, the once-per-version local cache,
and text that each start appends to (here on local paths; tests/train/test_gcs_runs.py runs them
against a GCS emulator)."""

from __future__ import annotations

import os

from jip2p import storage


def _tree(root, files: dict[str, str]) -> None:
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_upload_replaces_the_folder_and_writes_the_index_last(tmp_path, monkeypatch):
  _tree(tmp_path / "src", {"model_index.json": "{}", "unet/config.json": "u", "vae/w": "v"})
  _tree(tmp_path / "dst", {"stale": "old"})
  order = []
  copy = storage._copy_file
  monkeypatch.setattr(storage, "_copy_file", lambda a, b: (order.append(b.name), copy(a, b)))
  storage.upload_folder(str(tmp_path / "src"), str(tmp_path / "dst"), last="model_index.json")
  assert order[-1] == "model_index.json" and len(order) == 3
  assert sorted(os.listdir(tmp_path / "dst")) == ["model_index.json", "unet", "vae"]
  assert (tmp_path / "dst" / "unet" / "config.json").read_text() == "u"


def test_local_copy_is_made_once_per_version(tmp_path, monkeypatch):
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
  _tree(tmp_path / "model", {"model_index.json": "{}", "unet/w": "one"})
  first = storage.local_copy(str(tmp_path / "model"))
  assert storage.local_copy(str(tmp_path / "model")) == first
  assert open(os.path.join(first, "unet", "w")).read() == "one"
  (tmp_path / "model" / "unet" / "w").write_text("two!")  # a re-export: new size and time
  second = storage.local_copy(str(tmp_path / "model"))
  assert second != first and open(os.path.join(second, "unet", "w")).read() == "two!"
  assert sorted(os.listdir(tmp_path / "cache")) == sorted([os.path.basename(first),
                                                           os.path.basename(second)])


def test_appended_text_keeps_every_start(tmp_path):
  path = str(tmp_path / "run" / "train.log")
  for start in ("first", "second"):
    log = storage.AppendedText(path)
    log.write(f"{start} start\n")
    log.flush()
  assert open(path).read() == "first start\nsecond start\n"


def test_working_copy_stores_new_and_changed_files_back_even_on_failure(tmp_path, monkeypatch):
  """A remote output folder (a local one standing in: only `is_remote` is faked; the GCS emulator
  test runs jip2p-eval on gs://): a local copy holding what is there, new and changed files
  copied back, unchanged ones left alone, errors naming the remote folder."""
  import pytest

  from jip2p.errors import ConfigError
  remote = tmp_path / "remote-out"
  _tree(remote, {"run.json": "{}", "results.jsonl": "row 1\n"})
  monkeypatch.setattr(storage, "is_remote", lambda path: "remote-out" in os.fspath(path))
  copied = []
  copy = storage._copy_file
  monkeypatch.setattr(storage, "_copy_file", lambda a, b: (copied.append(str(b)), copy(a, b)))
  with storage.working_copy(str(remote)) as local:
    assert local != str(remote) and sorted(os.listdir(local)) == ["results.jsonl", "run.json"]
    with open(os.path.join(local, "results.jsonl"), "a") as f:
      f.write("row 2\n")
    _tree(tmp_path / local, {"images/a.png": "png"})
    copied.clear()
  assert (remote / "results.jsonl").read_text() == "row 1\nrow 2\n"
  assert (remote / "images" / "a.png").read_text() == "png"
  assert sorted(copied) == [str(remote / "images" / "a.png"), str(remote / "results.jsonl")]
  assert not os.path.exists(local)

  with pytest.raises(ConfigError, match=f"^{remote} holds results of another run$"):
    with storage.working_copy(str(remote) + "/") as local:
      _tree(tmp_path / local, {"summary.csv": "kept"})
      raise ConfigError(f"{local} holds results of another run")
  assert (remote / "summary.csv").read_text() == "kept"

  with storage.working_copy(str(tmp_path / "plain")) as local:  # a local folder: itself
    assert local == str(tmp_path / "plain")
