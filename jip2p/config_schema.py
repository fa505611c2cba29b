"""The strict schema check every kind of config shares (training's, generation's).

A config file starts from its program's ``base_config()`` and changes values; `check_keys`
compares it with that base: a key the base lacks (a typo such as ``config.optimiser``) or a value
of another type must stop the program at start with one line naming it, never be ignored.
"""

from __future__ import annotations

from collections.abc import Collection

import ml_collections

from jip2p.errors import ConfigError


def check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, *,
               free: Collection[str] = (), prefix: str = "") -> None:
  """Raises `ConfigError` unless ``config`` has exactly ``schema``'s keys, each value of the type
  of the schema's (an int is fine where a float is expected; a bool is never a number).

  free: dotted names of groups checked for presence only, whose keys and values a parser of their
  own checks (values that take several forms).
  """
  unknown = sorted(set(config.keys()) - set(schema.keys()))
  if unknown:
    names = ", ".join(prefix + k for k in unknown)
    raise ConfigError(f"unknown config key(s): {names}")
  for key in schema.keys():
    if key not in config:
      raise ConfigError(f"config is missing key {prefix + key}")
    value, expected = config[key], schema[key]
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config.{prefix + key} must be a group of settings, got {value!r}")
      if prefix + key not in free:
        check_keys(value, expected, free=free, prefix=prefix + key + ".")
      continue
    if isinstance(expected, bool) or not isinstance(expected, (int, float)):
      ok = isinstance(value, type(expected))
    else:
      numeric = (int, float) if isinstance(expected, float) else (int,)
      ok = isinstance(value, numeric) and not isinstance(value, bool)
    if not ok:
      raise ConfigError(f"config.{prefix + key}={value!r} must be of type "
                        f"{type(expected).__name__}")
