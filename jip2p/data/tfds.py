"""TFDS views of the triplet schema: features, metadata for written directories, and a builder.

* `features()`: the schema as a `tfds.features.FeaturesDict` (images decode to uint8 [H, W, 3]).
* `write_metadata(directory, manifest)`: makes a `DatasetWriter` directory a TFDS dataset, so
  `tfds.builder_from_directory(directory)` reads it; write to `<data_dir>/<name>/<version>` and
  `tfds.load(name, data_dir=<data_dir>)` works too.
* `InstructPix2Pix`: the TFDS builder `instruct_pix2pix`, one config per importer, reading the
  files a user downloaded from `manual_dir` (TFDS cannot download them here):

      builder = tfds.builder("instruct_pix2pix/magicbrush", data_dir=...)  # after importing this
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir="/path/to/files"))
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
from etils import epath

from jip2p.data import importers, schema
from jip2p.data.tf_setup import import_tf

import_tf()  # Before TFDS imports TensorFlow: no GPU may be visible to it.
import tensorflow_datasets as tfds_lib  # noqa: E402

FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}"


def features() -> tfds_lib.features.FeaturesDict:
  """The schema's fields as TFDS features, keyed by the record keys."""
  mapping = {}
  for f in schema.FIELDS:
    if f.kind == "image":
      mapping[f.name] = tfds_lib.features.Image(shape=(None, None, 3), doc=f.doc)
    elif f.kind == "mask":  # Encoded PNG bytes, b"" when absent (an Image feature needs pixels).
      mapping[f.name] = tfds_lib.features.Tensor(shape=(), dtype=np.bytes_, doc=f.doc)
    elif f.kind == "text":
      mapping[f.name] = tfds_lib.features.Text(doc=f.doc)
    elif f.kind == "int":
      mapping[f.name] = tfds_lib.features.Scalar(np.int64, doc=f.doc)
    else:
      mapping[f.name] = tfds_lib.features.Scalar(np.float32, doc=f.doc)
  return tfds_lib.features.FeaturesDict(mapping)


def write_metadata(directory: str, manifest: dict) -> None:
  """Writes `dataset_info.json` and `features.json` for the splits listed in `manifest`."""
  name = manifest["name"]
  template = tfds_lib.core.ShardedFileTemplate(
      data_dir=directory, template=FILENAME_TEMPLATE, dataset_name=name,
      filetype_suffix="tfrecord")
  split_infos = []
  for split, info in sorted(manifest["splits"].items()):
    if not info["shards"]:
      continue
    split_infos.append(tfds_lib.core.SplitInfo(
        name=split, shard_lengths=[s["num_examples"] for s in info["shards"]],
        num_bytes=sum(s["num_bytes"] for s in info["shards"]),
        filename_template=template.replace(split=split)))
  if not split_infos:
    return
  tfds_lib.folder_dataset.write_metadata(
      data_dir=directory, features=features(), split_infos=split_infos,
      version=manifest.get("version", "1.0.0"), filename_template=template, check_data=False,
      description=manifest.get("description") or "InstructPix2Pix edit triplets written by jip2p.")


@dataclasses.dataclass
class InstructPix2PixConfig(tfds_lib.core.BuilderConfig):
  """Which importer reads `manual_dir`, and the fraction of prompts held out for validation."""

  importer: str = "hf_parquet"
  validation_fraction: float = 0.0
  split_seed: int = 0


class InstructPix2Pix(tfds_lib.core.GeneratorBasedBuilder):
  """InstructPix2Pix-style edit triplets from files downloaded by hand."""

  name = "instruct_pix2pix"
  VERSION = tfds_lib.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "jip2p triplet schema version 1."}
  BUILDER_CONFIGS = [
      InstructPix2PixConfig(
          name="clip_filtered", importer="hf_parquet", validation_fraction=0.01,
          description="timbrooks/instructpix2pix-clip-filtered parquet shards (313,010 rows)."),
      InstructPix2PixConfig(
          name="samples_1000", importer="hf_parquet",
          description="fusing/instructpix2pix-1000-samples parquet shards."),
      InstructPix2PixConfig(
          name="generator", importer="generator", validation_fraction=0.01,
          description="The original generator's output folder (seeds.json, 0000000/, ...)."),
      InstructPix2PixConfig(
          name="magicbrush", importer="magicbrush",
          description="MagicBrush parquet shards: train-*.parquet → train, dev-*.parquet → "
                      "validation."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put the downloaded files in manual_dir:
    clip_filtered / samples_1000: the dataset's *.parquet files (any sub-folders);
    generator: the generator's output folder itself (holding seeds.json);
    magicbrush: the train-*.parquet and dev-*.parquet files.
  """

  @tfds_lib.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9 finds this through `importlib_resources`, a package it only installs on Python
    # < 3.9, and fails without it; the answer it would find is this file.
    return epath.Path(__file__)

  def _info(self) -> tfds_lib.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(), homepage="https://www.timothybrooks.com/instruct-pix2pix")

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    config = self.builder_config
    if config.importer == "magicbrush":
      files = importers.list_parquet(root)
      by_split = {"train": [f for f in files if os.path.basename(f).startswith("train")],
                  "validation": [f for f in files if os.path.basename(f).startswith("dev")]}
      return {split: self._generate_examples(functools.partial(importers.iter_magicbrush, fs), None)
              for split, fs in by_split.items() if fs}

    def rows():
      if config.importer == "generator":
        return importers.iter_generator(root)
      return importers.iter_hf_parquet(importers.list_parquet(root))

    if config.validation_fraction <= 0:
      return {"train": self._generate_examples(rows, None)}
    return {split: self._generate_examples(rows, split) for split in ("train", "validation")}

  def _generate_examples(self, rows, split):
    config = self.builder_config
    for row in rows():
      if split is not None and importers.assign_split(
          row.group, config.validation_fraction, config.split_seed) != split:
        continue
      if row.triplet is None:
        continue
      triplet = importers.prepare(row.triplet)
      if isinstance(triplet, str):  # The reason it was rejected.
        continue
      record = schema.to_record(triplet)
      yield row.key, {k: v.decode("utf-8") if schema.FIELDS_BY_NAME[k].kind == "text" else v
                      for k, v in record.items()}
