"""`jip2p-prompts`: captions → InstructPix2Pix prompts (instruction, edited caption) by an LLM.

  jip2p-prompts --captions captions.txt --out prompts.jsonl \\
      --url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-7B-Instruct [--concurrency 16]
  jip2p-generate --config configs/generate_sd15.py:... --prompts prompts.jsonl --out DIR

Stage 1 of the paper's data, with any OpenAI-compatible chat/completions server (vLLM, TGI,
llama.cpp's server, a hosted API) in place of the paper's fine-tuned GPT-3. The server is shown
--shots examples of --examples (human-written triplets in the paper's format: one JSON object per
line with input, edit, output; default: the ones shipped in data/prompt-examples.jsonl) and
answers each caption with a JSON object {"edit", "output"}.

Captions: a text file, one per line, or a .jsonl file of objects with a caption, input or text
string. Duplicate captions are asked once. The server: --url (or $JIP2P_LLM_URL, else
$OPENAI_BASE_URL), --model (or $JIP2P_LLM_MODEL), the key in $JIP2P_LLM_API_KEY or
$OPENAI_API_KEY (--api-key works too, but shows in the process list).

Kept triplets go to OUT (the prompts JSONL jip2p-generate reads: input, edit, output, plus the
caption's 0-based line number as caption_index); the ones the paper's filters drop (edited
caption equal to the input, an empty or overlong edit, a malformed reply) go to
OUT.rejected.jsonl with their reason. HTTP 408/429/5xx, timeouts and refused connections are
retried with back-off; any other refusal (wrong key, model or URL) stops the run in one line,
exit 2. Rerunning the same command resumes: finished captions are not asked again, a torn last
line (kill -9 in mid-write) is cut off, and captions whose retries ran out are asked again; a run
that leaves any unanswered exits 2 saying so.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from jip2p.cli import run
from jip2p.errors import ConfigError, ServerError

PROG = "jip2p-prompts"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  from jip2p.p2p import llm_prompts
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--captions", required=True,
                      help="captions: a text file (one per line) or .jsonl (caption/input/text)")
  parser.add_argument("--out", required=True, help="the prompts JSONL to write (appended to)")
  parser.add_argument("--examples", default=llm_prompts.DEFAULT_EXAMPLES,
                      help="few-shot examples, JSONL with input, edit, output (default: "
                           "%(default)s)")
  parser.add_argument("--url", default=os.environ.get("JIP2P_LLM_URL")
                      or os.environ.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1",
                      help="the server's API base, e.g. http://127.0.0.1:8000/v1 (default: "
                           "$JIP2P_LLM_URL, $OPENAI_BASE_URL or %(default)s)")
  parser.add_argument("--model", default=os.environ.get("JIP2P_LLM_MODEL"),
                      help="the model name the server knows (default: $JIP2P_LLM_MODEL)")
  parser.add_argument("--api-key", default=os.environ.get("JIP2P_LLM_API_KEY")
                      or os.environ.get("OPENAI_API_KEY"),
                      help="bearer token (default: $JIP2P_LLM_API_KEY or $OPENAI_API_KEY)")
  parser.add_argument("--shots", type=int, default=6, help="examples shown per caption")
  parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
  parser.add_argument("--temperature", type=float, default=0.7)
  parser.add_argument("--max-tokens", type=int, default=256, help="of each reply")
  parser.add_argument("--max-edit-words", type=int, default=25,
                      help="longer instructions are dropped")
  parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
  parser.add_argument("--retries", type=int, default=6,
                      help="retries of a request after 408/429/5xx, a timeout or no connection")
  parser.add_argument("--backoff", type=float, default=1.0,
                      help="first back-off in seconds, doubled per retry")
  parser.add_argument("--max-backoff", type=float, default=60.0)
  parser.add_argument("--malformed-retries", type=int, default=2,
                      help="asks again after a malformed reply before dropping the caption")
  parser.add_argument("--seed", type=int, default=0,
                      help="chooses each caption's examples; sent to the server with the line")
  parser.add_argument("--limit", type=int, help="only the first N lines of the captions file")
  return parser.parse_args(argv)


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  from tqdm import tqdm

  from jip2p import files
  from jip2p.p2p import llm_prompts
  if files.is_remote(args.out):
    raise ConfigError(f"--out {args.out}: write the prompts file locally (it is appended to)")
  if os.path.isdir(args.out):
    raise ConfigError(f"--out {args.out} is a folder; name the prompts file to write")
  for given in (args.captions, args.examples):
    if os.path.abspath(args.out) == os.path.abspath(given):
      raise ConfigError(f"--out {args.out} is an input file")
  if args.limit is not None and args.limit < 1:
    raise ConfigError(f"--limit must be ≥ 1, got {args.limit}")
  files.check_output_dir(os.path.dirname(os.path.abspath(args.out)))
  client = llm_prompts.ChatClient(
      args.url, args.model, args.api_key, temperature=args.temperature,
      max_tokens=args.max_tokens, timeout=args.timeout, retries=args.retries,
      backoff=args.backoff, max_backoff=args.max_backoff)
  examples = llm_prompts.read_examples(args.examples)
  captions = llm_prompts.read_captions(args.captions, args.limit)
  with tqdm(total=len(captions.by_index), desc=PROG, unit="caption", file=sys.stderr) as bar:
    def progress(report):
      bar.update(report.kept + sum(report.rejected.values()) - bar.n)

    report = llm_prompts.write_prompts(
        captions, args.out, client, examples, shots=args.shots,
        max_edit_words=args.max_edit_words, malformed_retries=args.malformed_retries,
        concurrency=args.concurrency, seed=args.seed, progress=progress)
  print(f"{PROG}: {report.summary()}")
  if report.failed:
    raise ServerError(f"{len(report.failed)} captions got no answer (first at line "
                      f"{report.failed[0] + 1}; {report.last_error}); rerun the same command to "
                      "ask for them again")
  print(f"prompts: {args.out}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
