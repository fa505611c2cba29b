"""runtime.configure: the compilation cache folder and thresholds the user or a launch script set
are kept."""

from __future__ import annotations

import jax
import pytest

from jip2p import runtime


@pytest.fixture
def updates(monkeypatch, tmp_path):
  for name in (runtime.CACHE_ENV, "JAX_COMPILATION_CACHE_DIR",
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  recorded = {}
  monkeypatch.setattr(jax.config, "update", lambda name, value: recorded.__setitem__(name, value))
  return recorded


def test_default_cache_is_created_under_home(updates, tmp_path):
  settings = runtime.configure(xla_flags=False)
  folder = str(tmp_path / "home" / ".cache" / "jip2p" / "jax")
  assert settings["compilation_cache"] == updates["jax_compilation_cache_dir"] == folder
  assert (tmp_path / "home" / ".cache" / "jip2p" / "jax").is_dir()
  assert updates["jax_persistent_cache_min_compile_time_secs"] == 1.0


def test_jax_cache_variable_of_the_launch_scripts_is_kept_even_on_gs(updates, monkeypatch,
                                                                      tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "gs://bucket/jax-cache")
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  runtime.configure(xla_flags=False)
  assert updates["jax_compilation_cache_dir"] == "gs://bucket/jax-cache"
  assert "jax_persistent_cache_min_compile_time_secs" not in updates
  assert list(tmp_path.iterdir()) == []  # nothing local made for a remote cache


def test_jip2p_variable_and_explicit_folder_win(updates, monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
  monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "jip2p"))
  runtime.configure(xla_flags=False)
  assert updates["jax_compilation_cache_dir"] == str(tmp_path / "jip2p")
  runtime.configure(xla_flags=False, cache_dir=str(tmp_path / "given"))
  assert updates["jax_compilation_cache_dir"] == str(tmp_path / "given")


def test_tuned_flags_are_added_and_the_users_own_values_win(updates, monkeypatch):
  """The CPU scheduler flag (the SD 1.5 train step's temporaries: 5.2 → 3.3 GiB) rides with the
  GPU flags; a value the user set for any of them is kept."""
  name = runtime.CPU_FLAGS[0].split("=")[0]
  monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {name}=true")
  settings = runtime.configure(cache_dir=None)
  flags = settings["xla_flags"].split()
  assert flags[:2] == ["--xla_force_host_platform_device_count=2", f"{name}=true"]
  assert set(flags[2:]) == set(runtime.GPU_FLAGS)
  monkeypatch.setenv("XLA_FLAGS", "")
  assert set(runtime.configure(cache_dir=None)["xla_flags"].split()) == set(runtime.TUNED_FLAGS)
  monkeypatch.setenv("XLA_FLAGS", "")
  assert runtime.configure(xla_flags=False, cache_dir=None)["xla_flags"] == ""
