"""``jip2p-edit``: edit images with an InstructPix2Pix model folder.

    jip2p-edit --model DIR --input photo.jpg --instruction "make it snowy" --output out.png
    jip2p-edit --model DIR --input photos/ --instruction "turn it into a painting" --output edits/
    jip2p-edit --model DIR --jsonl edits.jsonl --output edits/
    jip2p-edit --model SD_DIR --method sdedit --strength 0.75 --sampler ddim \
        --input photo.jpg --instruction "a photo of a snowy street" --output out.png

``--method sdedit`` is the paper's baseline, SDEdit, with a text-to-image model folder: the
"instruction" is then the *edited caption* (as the paper compares), the image is noised to the
step ``int(steps·strength)`` from the end and denoised towards it with guidance --text-guidance
(--image-guidance is not used); the last ``int(steps·strength)`` steps of the grid are run.

A JSONL file holds one ``{"image": PATH, "instruction": TEXT}`` object per line, image paths
relative to the file's folder. Edits are PNGs carrying the instruction, seed, guidance scales,
steps, sampler and model in their text metadata; edit j of a run uses seed ``--seed + j``, so any
one can be redone alone. `RULES` (printed by --help) says what is checked before any work and how
a rerun finishes an interrupted run.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import sys
from collections.abc import Sequence

from tqdm import tqdm

from jip2p import edit, files, runtime, storage
from jip2p.cli import VAE_HELP, run
from jip2p.diffusion import editing
from jip2p.errors import ConfigError, InputError, OutputError
from jip2p.models.attention import IMPLEMENTATIONS

PROG = "jip2p-edit"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RULES = """\
Before the model is loaded, every input image is read in full, every JSONL line parsed, and the
output folder checked to be writable: if any of them is bad, the run stops with one line naming
every bad file or line (exit status 2) and edits nothing. Each edit is written under a temporary
name and renamed when complete, so an output PNG that exists is whole. An existing output is
refused unless --overwrite (redo it) or --skip-existing (keep it); after an interrupted run (a full
disk, Ctrl-C), rerun with --skip-existing and the same --seed to finish it as one run would have.
An instruction longer than the text encoder reads (77 tokens) and an animated image (its first
frame is edited) each print a warning. An edit whose latents or pixels hold NaN or inf stops the
run naming the model part that produced them (text encoder, VAE, UNet/sampler)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog=PROG, description="Edit images by written instructions with an InstructPix2Pix model "
                             "(or by SDEdit, the paper's baseline, with a text-to-image model).",
      epilog=RULES, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, metavar="DIR",
                      help="diffusers-format InstructPix2Pix folder, SD 1.x/2.x or SDXL (see "
                           "jip2p-convert)")
  parser.add_argument("--vae", metavar="DIR", default=None, help=VAE_HELP)
  parser.add_argument("--input", nargs="+", metavar="PATH",
                      help="image files and/or folders of images (with --instruction)")
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--instruction", help="the edit applied to every input; \"\" returns the "
                                          "resized input")
  what.add_argument("--jsonl", metavar="FILE",
                    help='one {"image": PATH, "instruction": TEXT} per line')
  parser.add_argument("--output", required=True, metavar="PATH",
                      help="a .png file (one edit) or a folder")
  parser.add_argument("--method", choices=edit.METHODS, default="ip2p",
                      help="ip2p: an InstructPix2Pix model; sdedit: a text-to-image model, the "
                           "edited caption in --instruction's place")
  parser.add_argument("--strength", type=float, default=0.75,
                      help="SDEdit's strength in (0, 1]: the fraction of the steps run")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--text-guidance", type=float, default=7.5, help="s_T")
  parser.add_argument("--image-guidance", type=float, default=1.5, help="s_I")
  parser.add_argument("--resolution", type=int,
                      help="long side before the short side is rounded up to a multiple of the "
                           "model's size step (VAE downscale × UNet downsampling: 64 for Stable "
                           "Diffusion, 4 for the shipped data/synthetic-ip2p); itself a multiple "
                           "of it (default: the model's own size, 512 for Stable Diffusion)")
  parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
  parser.add_argument("--sampler", choices=edit.SAMPLERS, default="euler_ancestral")
  parser.add_argument("--schedule", choices=edit.SCHEDULES, default=None,
                      help="sigma grid (default: discrete, the reference's; edm, the only one, "
                           "for a model with an EDM scheduler such as CosXL Edit)")
  micro = parser.add_argument_group(
      "SDXL micro-conditioning", "what an SDXL model is told of each image, two integers in "
      "pixels each (defaults as diffusers' SDXL pipelines)")
  micro.add_argument("--original-size", type=int, nargs="+", metavar="N",
                     help="HEIGHT WIDTH of the original image (default: the edit's size)")
  micro.add_argument("--crops-coords-top-left", type=int, nargs="+", metavar="N",
                     help="TOP LEFT of the crop (default: 0 0)")
  micro.add_argument("--target-size", type=int, nargs="+", metavar="N",
                     help="HEIGHT WIDTH of the target (default: the edit's size)")
  parser.add_argument("--batch-size", type=int, default=1)
  parser.add_argument("--dtype", choices=sorted(edit.DTYPES), default="float32",
                      help="compute dtype (parameters stay float32)")
  parser.add_argument("--attention-impl", choices=IMPLEMENTATIONS, default="xla",
                      help="cudnn: the fused flash kernel on NVIDIA GPUs")
  existing = parser.add_mutually_exclusive_group()
  existing.add_argument("--overwrite", action="store_true", help="replace existing output files")
  existing.add_argument("--skip-existing", action="store_true",
                        help="keep existing output files and edit the rest (finishes a run)")
  args = parser.parse_args(argv)
  if args.jsonl is None and not args.input:
    parser.error("--instruction needs --input")
  if args.jsonl is not None and args.input:
    parser.error("--jsonl names its own images; drop --input")
  return args


def list_inputs(paths: Sequence[str]) -> list[str]:
  """Files as given, folders expanded to their image files (sorted, not recursive)."""
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(path, f) for f in os.listdir(path)
                     if f.lower().endswith(IMAGE_EXTENSIONS)
                     and os.path.isfile(os.path.join(path, f)))
      if not found:
        raise InputError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
      files += found
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise InputError(f"{path}: no such file or folder")
  return files


def read_jsonl(path: str) -> list[tuple[str, str]]:
  """(image path, instruction) pairs of a JSONL file; image paths relative to its folder. Every
  bad line is named in one `InputError`."""
  lines = files.read_lines(path, "JSONL file")
  folder = os.path.dirname(os.path.abspath(path))
  pairs, problems = [], []
  for number, line in enumerate(lines, 1):
    if line.strip():
      try:
        pairs.append(_parse_line(line, folder, f"{path}:{number}"))
      except InputError as e:
        problems.append(str(e))
  refuse_if_any(problems, len(problems) + len(pairs), "lines")
  if not pairs:
    raise InputError(f"{path}: no edits in the file")
  return pairs


def _parse_line(line: str, folder: str, where: str) -> tuple[str, str]:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise InputError(f"{where}: not JSON ({e})") from None
  if not isinstance(record, dict) or "image" not in record or "instruction" not in record:
    raise InputError(f'{where}: expected an object with "image" and "instruction"')
  image, instruction = record["image"], record["instruction"]
  if not isinstance(image, str) or not image:
    raise InputError(f"{where}: the image must be a path, got {image!r:.60}")
  if not isinstance(instruction, str):
    raise InputError(f"{where}: the instruction must be text, got "
                     f"{type(instruction).__name__} {instruction!r:.60}")
  return os.path.join(folder, image), instruction


def refuse_if_any(problems: Sequence[str], total: int, what: str) -> None:
  """One `InputError` naming every problem (one line), so a rerun does not find them one by one."""
  if len(problems) == 1:
    raise InputError(problems[0])
  if problems:
    raise InputError(f"{len(problems)} of {total} {what} cannot be used, nothing was edited: "
                     + "; ".join(problems))


def load_images(paths: Sequence[str]) -> dict[str, object]:
  """Each distinct path → its RGB image, read in full (truncation shows only then); every bad
  file is named in one `InputError`."""
  loaded, problems = {}, []
  for path in dict.fromkeys(paths):
    try:
      loaded[path] = edit.load_image(path)
    except InputError as e:
      problems.append(str(e))
  refuse_if_any(problems, len(loaded) + len(problems), "images")
  return loaded


def output_paths(output: str, inputs: Sequence[str], keep_existing: bool) -> list[str]:
  """One PNG path per edit: ``output`` itself, or ``output/<input stem>.png`` (``-<j>`` appended
  where stems repeat). Existing files are refused unless ``keep_existing``."""
  files.require_local(output, "--output")
  stem, ext = os.path.splitext(output)
  if not os.path.isdir(output) and ext.lower() in IMAGE_EXTENSIONS:
    if ext.lower() != ".png":
      raise InputError(f"{output}: edits are written as PNG; name the output .png or a folder")
    if len(inputs) != 1:
      raise InputError(f"{output} is one file but there are {len(inputs)} edits; give a folder")
    paths = [output]
  else:
    if os.path.exists(output) and not os.path.isdir(output):
      raise InputError(f"{output} exists and is not a folder")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in inputs]
    counts = collections.Counter(stems)
    paths = [os.path.join(output, s if counts[s] == 1 else f"{s}-{j}") + ".png"
             for j, s in enumerate(stems)]
  if not keep_existing:
    for path in paths:
      if os.path.exists(path):
        raise InputError(f"{path} exists; pass --overwrite to replace it or --skip-existing to "
                         "keep it")
  return paths


def resize_images(loaded: dict[str, object], resolution: int, multiple: int) -> dict[str, object]:
  """`edit.preprocess` of each image; every one that cannot be edited is named in one error."""
  resized, problems = {}, []
  for path, image in loaded.items():
    try:
      resized[path] = edit.preprocess(image, resolution, path, multiple)
    except InputError as e:
      problems.append(str(e))
  refuse_if_any(problems, len(loaded), "images")
  return resized


def write_png(image, path: str, metadata: dict[str, str]) -> None:
  """Writes atomically (a temporary sibling, then a rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.save_png(image, path, metadata)


def read_jobs(args: argparse.Namespace) -> list[tuple[str, str]]:
  """(image path, instruction) per edit, from --jsonl or --input and --instruction."""
  if args.jsonl is not None:
    return read_jsonl(args.jsonl)
  return [(path, args.instruction) for path in list_inputs(args.input)]


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  runtime.configure()  # Before JAX starts its backend (XLA reads its flags once).
  for key in ("steps", "batch_size"):
    if getattr(args, key) < 1:
      raise ConfigError(f"--{key.replace('_', '-')} must be ≥ 1, got {getattr(args, key)}")
  if args.resolution is not None and args.resolution < 1:  # The model's rule: once it is read.
    raise ConfigError(f"--resolution must be ≥ 1, got {args.resolution}")
  if args.method == "sdedit":
    editing.sdedit_start(args.steps, args.strength)
  micro = {key: edit.check_micro_conditioning(key, getattr(args, key),
                                              f"--{key.replace('_', '-')}")
           for key in edit.MICRO_CONDITIONING}
  jobs = read_jobs(args)
  if args.seed is not None and not 0 <= args.seed <= edit.MAX_SEED - len(jobs) + 1:
    raise ConfigError(f"--seed must be in [0, {edit.MAX_SEED - len(jobs) + 1}] for "
                      f"{len(jobs)} edits, got {args.seed}")
  outputs = output_paths(args.output, [path for path, _ in jobs],
                         args.overwrite or args.skip_existing)
  todo = [j for j, path in enumerate(outputs) if not (args.skip_existing and os.path.exists(path))]
  if not todo:
    print(f"{PROG}: all {len(jobs)} edits exist in {args.output}; nothing to do")
    return 0
  loaded = load_images([jobs[j][0] for j in todo])
  storage.check_writable(os.path.dirname(outputs[0]) or ".", "the output folder")
  editor = edit.Editor.from_pretrained(args.model, dtype=args.dtype,
                                       attention_impl=args.attention_impl, vae=args.vae)
  editor.check_method(args.method)
  given = [f"--{key.replace('_', '-')}" for key, value in micro.items() if value is not None]
  if given and not editor.sdxl:
    raise ConfigError(f"{', '.join(given)}: micro-conditioning is for SDXL models; {args.model} "
                      "is not one")
  if args.schedule is None:
    args.schedule = editor.default_schedule
  if args.resolution is None:
    args.resolution = editor.native_size
  edit.check_resolution(args.resolution, editor.size_multiple, "--resolution")
  resized = resize_images(loaded, args.resolution, editor.size_multiple)

  seed = args.seed
  if seed is None:
    seed = secrets.randbelow(edit.MAX_SEED - len(jobs) + 2)
    print(f"{PROG}: seed {seed} (pass --seed {seed} to repeat this run)")
  edits = editor.edits(
      [resized[jobs[j][0]] for j in todo], [jobs[j][1] for j in todo], steps=args.steps,
      text_guidance=args.text_guidance, image_guidance=args.image_guidance, resolution=None,
      seed=[seed + j for j in todo], sampler=args.sampler, schedule=args.schedule,
      batch_size=args.batch_size, names=[jobs[j][0] for j in todo], method=args.method,
      strength=args.strength, **micro)
  settings = {"text_guidance": str(args.text_guidance),
              "image_guidance": str(args.image_guidance), "steps": str(args.steps),
              "sampler": args.sampler, "schedule": args.schedule,
              "resolution": str(args.resolution), "dtype": args.dtype,
              "model": os.path.abspath(args.model), "software": "jip2p", "method": args.method}
  if args.method == "sdedit":
    settings["strength"] = str(args.strength)
  settings.update({key: " ".join(map(str, value)) for key, value in micro.items()
                   if value is not None})
  with tqdm(total=len(todo), desc=PROG, unit="image", file=sys.stderr) as bar:
    for done, (k, image) in enumerate(edits):
      j = todo[k]
      path, instruction = jobs[j]
      try:
        write_png(image, outputs[j], {"instruction": instruction, "seed": str(seed + j),
                                      "input": path, **settings})
      except OutputError as e:
        raise OutputError(
            f"{e}; {len(jobs) - len(todo) + done} "
            f"of {len(jobs)} edits are written: make room, then rerun with --skip-existing "
            f"--seed {seed} to finish") from None
      bar.update()
  print(f"{PROG}: wrote {len(todo)} edit{'s' if len(todo) != 1 else ''} to {args.output}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
