"""Config files load and validate; bad configs fail at start with a message naming the problem."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from jip2p.cli import train as train_cli
from jip2p.errors import ConfigError
from jip2p.train import config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def load(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", ["ip2p_sd15", "ip2p_sd15_512", "ip2p_sd21"])
def test_recipe_configs_validate_once_given_model_and_data(name):
  with pytest.raises(ConfigError, match="config.model.init is empty"):
    config_lib.validate(load(name))
  config = load(name, "init=/models/sd,data=/data/shards")
  config_lib.validate(config)
  assert config.batch_size == 1024 and config.optimizer.lr == 1e-4
  assert config.ema.decay == 0.9999 and config.conditioning_dropout == 0.05
  # 8 devices: per device × 8 × grad_accum = 1024.
  assert config_lib.mesh_shape(config, 8) == (8, 1)


def test_paper_recipe_values():
  c = load("ip2p_sd15", "init=/m,data=/d")
  assert (c.data.res, c.data.resize_min, c.data.resize_max, c.data.flip) == (256, 256, 288, True)
  assert c.batch_size // c.grad_accum // 8 == 32  # 32 per GPU × 8 GPUs × 4 accumulation
  assert (c.optimizer.weight_decay, c.optimizer.grad_clip_norm) == (0.01, 0.0)
  assert c.ema.warmup and c.model.unet_in_channels == 8


def test_tiny_config_validates():
  config = load("tiny")
  config_lib.validate(config)
  assert config.model.init == "random:tiny" and config.data.source == "synthetic"
  assert config_lib.mesh_shape(config, 8) == (8, 1)


def test_config_arguments_are_checked():
  with pytest.raises(ConfigError, match="unknown config argument 'resolution'"):
    load("ip2p_sd15", "resolution=512")
  with pytest.raises(ConfigError, match="not of the form key=value"):
    load("ip2p_sd15", "512")
  assert load("ip2p_sd15", "res=512").data.resize_max == 576


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.optimizer, "lr", -1.0), "config.optimizer.lr=-1.0 must be positive"),
    (lambda c: setattr(c, "grad_accum", 3), "not divisible by config.grad_accum=3"),
    (lambda c: setattr(c, "nonfinite", "ignore"), "config.nonfinite='ignore'"),
    (lambda c: setattr(c.model, "compute_dtype", "fp8"), "config.model.compute_dtype='fp8'"),
    (lambda c: setattr(c.model, "unet_in_channels", 5), "must be 2 × the VAE.s latent channels"),
    (lambda c: setattr(c.data, "path", ""), "config.data.path is empty"),
    (lambda c: setattr(c, "conditioning_dropout", 0.5), "must be in \\[0, 1/3\\]"),
    (lambda c: setattr(c.export, "at_end", "ema,best"), "config.export.at_end='ema,best'"),
])
def test_bad_values_are_named(change, message):
  config = load("ip2p_sd15", "init=/m,data=/d")
  change(config)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


def test_unknown_and_mistyped_keys():
  config = load("ip2p_sd15", "init=/m,data=/d")
  config.optimizer.lrate = 1e-4
  with pytest.raises(ConfigError, match="unknown config key\\(s\\): optimizer.lrate"):
    config_lib.validate(config)
  config = load("ip2p_sd15", "init=/m,data=/d")
  with config.ignore_type():
    config.batch_size = "1024"
  with pytest.raises(ConfigError, match="config.batch_size='1024' must be of type int"):
    config_lib.validate(config)


def test_device_checks():
  config = load("ip2p_sd15", "init=/m,data=/d,batch=1000")
  with pytest.raises(ConfigError, match="250 examples per micro-step do not split evenly over 8"):
    config_lib.mesh_shape(config, 8)
  config = load("ip2p_sd15", "init=/m,data=/d,fsdp=3")
  with pytest.raises(ConfigError, match="config.mesh.fsdp=3 does not divide the 8 devices"):
    config_lib.mesh_shape(config, 8)
  config = load("ip2p_sd15", "init=/m,data=/d,fsdp=4")
  assert config_lib.mesh_shape(config, 8) == (2, 4)
  config.mesh.data = 4
  with pytest.raises(ConfigError, match="16 devices, but there are 8"):
    config_lib.mesh_shape(config, 8)


def _cli(args, capsys):
  code = train_cli.main(args)
  return code, capsys.readouterr().err


def test_cli_reports_bad_configs_without_traceback(tmp_path, capsys):
  tiny = str(CONFIGS / "tiny.py")
  code, err = _cli([f"--config={tiny}", "--config.optimizer.lrr=1", f"--workdir={tmp_path}"],
                   capsys)
  assert code == 2 and "lrr" in err and "Traceback" not in err
  code, err = _cli([f"--config={tiny}", "--config.batch_size=12", f"--workdir={tmp_path}"],
                   capsys)
  assert code == 2 and "12 examples per micro-step do not split evenly over 8 devices" in err
  code, err = _cli([f"--config={CONFIGS / 'ip2p_sd15.py'}", f"--workdir={tmp_path}"], capsys)
  assert code == 2 and "config.model.init is empty" in err
  code, err = _cli([f"--config={tiny}"], capsys)
  assert code == 2 and "--workdir is required" in err


def test_a_work_directory_from_before_a_key_existed_reads_with_its_default(tmp_path):
  """Keys added since a run was started take their defaults (the old behaviour); a key this
  version does not know is still refused."""
  import json
  config = load("tiny")
  saved = config.to_dict()
  del saved["task"], saved["model"]["text_encoder"]
  (tmp_path / config_lib.CONFIG_FILE).write_text(json.dumps(saved))
  back = config_lib.read_config(str(tmp_path))
  assert back.task == "edit" and back.model.text_encoder == ""
  assert back.to_dict() == config.to_dict()
  saved["model"]["typo"] = 1
  (tmp_path / config_lib.CONFIG_FILE).write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match="unknown config key"):
    config_lib.read_config(str(tmp_path))


def test_the_saved_config_is_replaced_whole(tmp_path, monkeypatch):
  """A full disk while config.json is rewritten (a resumed run) leaves the run's file, which
  jip2p-export reads, as it was, and says so in one line."""
  import builtins
  import errno

  from jip2p.errors import OutputError
  config_lib.write_config(load("tiny"), str(tmp_path))
  saved = (tmp_path / config_lib.CONFIG_FILE).read_text()

  class FullDisk:
    def __init__(self, path, mode):
      self.file = builtins.open(path, mode)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.file.close()

    def write(self, text):
      self.file.write(text[:10])
      self.file.flush()
      raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(config_lib, "open", FullDisk, raising=False)
  with pytest.raises(OutputError, match=f"cannot write {tmp_path}/config.json: No space left"):
    config_lib.write_config(load("tiny", "steps=3"), str(tmp_path))
  assert (tmp_path / config_lib.CONFIG_FILE).read_text() == saved
  assert sorted(p.name for p in tmp_path.iterdir()) == [config_lib.CONFIG_FILE]
