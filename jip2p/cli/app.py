"""``jip2p-app``: the web editor (Gradio) on a local model folder.

    jip2p-app                                   # the shipped world editor, data/synthetic-ip2p
    jip2p-app --model DIR                       # http://127.0.0.1:7860, this machine only
    jip2p-app --model DIR --host 0.0.0.0        # reachable from the network: mind who can use it

Without ``--model`` it serves the small world editor shipped in data/synthetic-ip2p (32 px scenes
of shapes), so it works on a fresh machine. ``--resolution`` defaults to the model's own size and
must be a multiple of its size step (VAE downscale × UNet downsampling: 64 for Stable Diffusion,
4 for the shipped model). Uploads are centre-fitted to a few shapes (``--size-buckets``), the
step count is data in the compiled edit, and compiled programs are kept on disk
(`jip2p.runtime`): another step count, an aspect ratio in a shape already used, or a restart
compiles nothing. One edit runs at a time; others wait in a queue of ``--max-queue``. The
address is checked free and the model folder loaded before the server starts, so either problem
is one line, exit 2.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

from jip2p import edit, runtime
from jip2p.cli import VAE_HELP, run
from jip2p.errors import ConfigError
from jip2p.models.attention import IMPLEMENTATIONS

PROG = "jip2p-app"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  from jip2p.demo_run import PRETRAINED
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--model", default=PRETRAINED, metavar="DIR",
                 help="InstructPix2Pix model folder (default: the world editor shipped in "
                      "data/synthetic-ip2p)")
  p.add_argument("--vae", metavar="DIR", default=None, help=VAE_HELP)
  p.add_argument("--host", default="127.0.0.1", help="address to listen on")
  p.add_argument("--port", type=int, default=7860)
  p.add_argument("--resolution", type=int,
                 help="long side of the editor's resize rule, a multiple of the model's size step "
                      "(default: the model's own size: 512 for Stable Diffusion, 32 for the "
                      "shipped model)")
  p.add_argument("--steps", type=int, default=50, help="the steps field's starting value")
  p.add_argument("--size-buckets", type=int, default=4, metavar="N",
                 help="centre-fit uploads to one of 2N − 1 shapes (long side --resolution, short "
                      "side a multiple of resolution/N), so that a handful of compiled programs "
                      "serve every aspect ratio; 0: the reference's resize rule, one program per "
                      "1/64 of aspect ratio")
  p.add_argument("--max-queue", type=int, default=16, help="edits that may wait")
  p.add_argument("--dtype", choices=sorted(edit.DTYPES), default="float32")
  p.add_argument("--attention-impl", choices=IMPLEMENTATIONS, default="xla")
  return p.parse_args(argv)


def check_address(host: str, port: int) -> None:
  """Refuses an address the server could not listen on (in use, unknown host) before any work."""
  try:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      probe.bind(address)
  except OSError as e:
    raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another "
                      "--port or --host") from None


def resolution(model: str, asked: int | None) -> int:
  """The resize rule's long side: ``asked``, checked against the model's size rule, or the
  model's own size (read from its config files, before the weights are loaded)."""
  multiple, native = edit.model_sizes(model)
  if asked is None:
    return native
  edit.check_resolution(asked, multiple, "--resolution")
  return asked


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  runtime.configure()  # Before JAX starts its backend: the persistent compilation cache.
  for name, least in (("steps", 1), ("max_queue", 1), ("port", 1), ("size_buckets", 0)):
    if getattr(args, name) < least:
      raise ConfigError(f"--{name.replace('_', '-')} must be ≥ {least}, got "
                        f"{getattr(args, name)}")
  if args.port > 65535:
    raise ConfigError(f"--port must be ≤ 65535, got {args.port}")
  check_address(args.host, args.port)
  args.resolution = resolution(args.model, args.resolution)
  editor = edit.Editor.from_pretrained(args.model, dtype=args.dtype,
                                       attention_impl=args.attention_impl, vae=args.vae)
  editor.check_method("ip2p")  # an InstructPix2Pix model, before any work
  from jip2p import app  # Gradio loads only once the model did.
  print(f"{PROG}: serving {args.model} on http://{args.host}:{args.port}", file=sys.stderr)
  app.launch(app.build_app(editor, resolution=args.resolution, steps=args.steps,
                           size_buckets=args.size_buckets or None),
             host=args.host, port=args.port, max_queue=args.max_queue)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
