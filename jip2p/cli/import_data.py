"""`jip2p-import`: turns downloaded InstructPix2Pix-style datasets into jip2p TFRecord datasets.

  jip2p-import parquet     PARQUET... --out DIR --preset ultraedit [--where 'clip_sim_dir>0.2']
  jip2p-import parquet     PARQUET... --out DIR --map input=…,edited=…,instruction=…
  jip2p-import hf-parquet  PARQUET... --out DIR   # clip-filtered or 1000-samples shards
  jip2p-import generator   FOLDER     --out DIR   # the original generator's output folder
  jip2p-import magicbrush  PARQUET... --out DIR [--split validation]
  jip2p-import synthetic   --num 20000 --out DIR  # the procedural edit world (jip2p.data.synthetic)

PARQUET arguments may be files, folders or globs; local or gs://.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from jip2p.cli import run
from jip2p.errors import ConfigError, InputError

PROG = "jip2p-import"
EPILOG = ("The options, the source (files, parquet columns and their types, seeds.json) and the "
          "output folder are checked before anything is written; a problem is one line naming "
          "it, exit status 2. Rows that cannot be used (an undecodable image, an empty "
          "instruction, an unreadable parquet row group) are skipped and counted in the report; "
          "when no row at all can be imported the run exits 2 and leaves no dataset. Rerunning "
          "the same command after an interruption (a kill, a full disk) resumes: rows already "
          "stored are skipped, none is written twice; a rerun into the same --out with other "
          "inputs or split/storage options is refused, since it would mix two imports.")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                   epilog=EPILOG)
  sub = parser.add_subparsers(dest="source", required=True)
  sources = {
      "parquet": ("any parquet edit dataset, through a --preset and/or a --map of its columns",
                  "PARQUET"),
      "hf-parquet": ("parquet shards of timbrooks/instructpix2pix-clip-filtered or "
                     "fusing/instructpix2pix-1000-samples", "PARQUET"),
      "generator": ("the original generator's folder (seeds.json, 0000000/prompt.json, ...)",
                    "FOLDER"),
      "magicbrush": ("MagicBrush parquet shards", "PARQUET"),
  }
  sources["synthetic"] = ("the procedural edit world: coloured shapes and exact edits", None)
  for name, (help_text, metavar) in sources.items():
    p = sub.add_parser(name, help=help_text, epilog=EPILOG)
    if metavar is None:
      p.add_argument("--num", type=int, required=True, help="examples to write")
      p.add_argument("--seed", type=int, default=0,
                     help="world seed (use another seed for evaluation scenes)")
      p.add_argument("--size", type=int, default=64, help="image side in pixels (≥ 32)")
      p.add_argument("--wording", choices=("train", "heldout"), default="train",
                     help="instruction templates: the training ones or the held-out ones")
      p.add_argument("--families", default=None,
                     help="comma-separated edit families to draw from (default: all of "
                          "recolour,remove,add,move,background,swap)")
    else:
      p.add_argument("inputs", nargs="+" if metavar == "PARQUET" else 1, metavar=metavar)
    if name == "parquet":
      from jip2p.data.importers import PRESETS, ROLES
      p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="a published layout: " + "; ".join(
                         f"{k} = {v.doc}" for k, v in sorted(PRESETS.items())))
      p.add_argument("--map", default="",
                     help="role=column,... (added to or overriding the preset's); roles: "
                          + ", ".join(ROLES) + ". input/edited/instruction are required; "
                          "id and group may join columns with '+'; an image column given here "
                          "may also hold paths relative to its parquet file's folder; "
                          "mask= (empty) drops a preset's mask")
      p.add_argument("--where", action="append", default=[], metavar="COLUMN OP VALUE",
                     help="keep only rows where this holds, e.g. 'clip_sim_dir>0.2' or "
                          "'edit_type==remove' (OP: >= <= == != > <); repeatable, all must hold")
      p.add_argument("--prompts", choices=("first", "each"), default="first",
                     help="a list-valued instruction column: a triplet of its first prompt, or "
                          "one per prompt")
    p.add_argument("--out", required=True, help="dataset directory (local or gs://)")
    p.add_argument("--name", default="jip2p_triplets",
                   help="dataset name, used in shard file names and by TFDS")
    p.add_argument("--examples-per-shard", type=int, default=1000)
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of prompts (MagicBrush: sessions; parquet: its groups) put "
                        "in 'validation'")
    p.add_argument("--split-seed", type=int, default=0, help="salt of the prompt → split hash")
    p.add_argument("--split", default=None,
                   help="put every row in this split instead (e.g. MagicBrush dev → validation)")
    p.add_argument("--store-resolution", type=int, default=None,
                   help="resize images whose short side is longer to this short side (e.g. 288)")
    p.add_argument("--store-format", choices=("jpeg", "png"), default="jpeg",
                   help="encoding of resized images")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--workers", type=int, default=None,
                   help="threads decoding images (default: all cores)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every skipped row")
  return parser.parse_args(argv)


def _rows(args: argparse.Namespace):
  """The source's rows; its files, folders and columns are checked here, before anything is
  written (the rows themselves are read lazily)."""
  from jip2p.data import importers
  if args.source == "synthetic":
    if args.num < 1:
      raise ConfigError(f"--num={args.num} must be at least 1")
    from jip2p.data import synthetic
    families = synthetic.FAMILIES if args.families is None else tuple(args.families.split(","))
    synthetic.check_families(families)
    args.inputs = [f"synthetic:num={args.num},seed={args.seed},size={args.size},"
                   f"wording={args.wording},families={'+'.join(families)}"]
    return importers.iter_synthetic(args.num, seed=args.seed, size=args.size,
                                    wording=args.wording, families=families)
  if args.source == "generator":
    return importers.iter_generator(args.inputs[0])
  if args.source == "parquet":
    source, mapping, skip_if_set = importers.resolve_mapping(
        args.preset, importers.parse_mapping(args.map))
    user_mapping = importers.parse_mapping(args.map)
    where = [importers.parse_where(w) for w in args.where]
    return importers.iter_parquet(
        importers.list_parquet(args.inputs), mapping, source=source, where=where,
        prompts=args.prompts, skip_if_set=skip_if_set,
        image_paths=any(r in user_mapping for r in importers.IMAGE_ROLES))
  if args.source == "magicbrush":
    return importers.iter_magicbrush(importers.list_parquet(args.inputs))
  return importers.iter_hf_parquet(importers.list_parquet(args.inputs))


def _check_same_import(out: str, metadata: dict) -> None:
  """A rerun resumes by row number, so it must be the same import: a `ConfigError` naming what
  differs from the run that stored rows in ``out`` (keys it did not record are not compared)."""
  from jip2p.data import writer
  from jip2p.data.tf_setup import import_tf
  try:
    manifest = writer.read_manifest(out)
  except (InputError, import_tf().errors.OpError):
    return  # no dataset there yet, or one the writer will name the problem of
  if not any(info["shards"] for info in manifest["splits"].values()):
    return  # nothing stored: nothing to mix
  stored = manifest.get("metadata") or {}
  changed = [k for k, v in metadata.items() if k in stored and stored[k] != v]
  if changed:
    raise ConfigError(
        f"{out} was imported with " + ", ".join(f"{k}={stored[k]!r}" for k in changed)
        + "; this run has " + ", ".join(f"{k}={metadata[k]!r}" for k in changed)
        + ": resuming would mix two imports; rerun the same command or choose another --out")


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format="%(levelname)s %(message)s")
  from jip2p.data import importers
  from jip2p.data.writer import DatasetWriter
  options = dict(validation_fraction=args.val_fraction, split_seed=args.split_seed,
                 split=args.split, store_resolution=args.store_resolution,
                 store_format=args.store_format, jpeg_quality=args.jpeg_quality,
                 workers=args.workers)
  importers.check_options(**{k: v for k, v in options.items() if k != "split_seed"})
  rows = _rows(args)
  metadata = {"importer": args.source, "inputs": list(args.inputs),
              "store_resolution": args.store_resolution,
              "store_format": args.store_format if args.store_resolution else None,
              "jpeg_quality": args.jpeg_quality if args.store_resolution else None,
              "val_fraction": args.val_fraction, "split_seed": args.split_seed,
              "split": args.split}
  if args.source == "parquet":
    metadata |= {"preset": args.preset, "map": args.map, "where": args.where,
                 "prompts": args.prompts}
  _check_same_import(args.out, metadata)

  def progress(report):
    print(f"{PROG}: {report.rows} rows, written {dict(report.written)}, "
          f"skipped {sum(report.skipped.values())}", file=sys.stderr, flush=True)

  writer = DatasetWriter(args.out, name=args.name, examples_per_shard=args.examples_per_shard,
                         metadata=metadata)
  with writer:
    report = importers.import_rows(rows, writer, progress=progress, **options)
    if not report.written and not report.resumed:  # nothing stored: not a dataset to train on
      inputs = " ".join(args.inputs)
      if not report.rows:
        raise InputError(f"{inputs} holds no rows; nothing was written")
      reasons = ", ".join(f"{n} {reason}" for reason, n in report.skipped.most_common())
      raise InputError(f"no row of {inputs} could be imported ({report.rows} read: {reasons}); "
                       "nothing was written")
  print(report.summary())
  print(f"dataset: {args.out}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
