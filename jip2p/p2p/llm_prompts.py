"""Stage 1 of the paper's data with an open LLM: caption → (instruction, edited caption).

The paper fine-tuned GPT-3 on 700 human-written triplets and sampled it on LAION captions; that
model was never released. Here any OpenAI-compatible ``chat/completions`` server (vLLM, TGI,
llama.cpp's server, a hosted API) writes the triplets, shown a few human-written examples in the
paper's format (``input``, ``edit``, ``output``) as earlier turns of the conversation. Only the
standard library talks HTTP.

    client = ChatClient("http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-7B-Instruct")
    report = write_prompts(read_captions("captions.txt"), "prompts.jsonl", client,
                           read_examples(DEFAULT_EXAMPLES))

Output: one JSON line per kept caption, ``{"input", "edit", "output", "caption_index"}`` — the
prompts file ``jip2p-generate`` reads (it ignores ``caption_index``, the caption's 0-based line
number). Captions the filters drop go to ``OUT.rejected.jsonl`` with their reason (and the reply),
so a rerun neither asks for them again nor loses their count.

The paper's filters: a reply whose edited caption equals the input caption (compared without case,
surrounding spaces or a final full stop), an empty edit or output, an edit longer than
``max_edit_words`` words, and duplicates (a caption met earlier in the file is asked once) are
dropped and counted. A reply that is not the JSON object asked for is *malformed*: counted, asked
again up to ``malformed_retries`` times, then rejected.

Requests run on ``concurrency`` threads. HTTP 408, 429, 5xx, timeouts and refused connections are
retried with exponential back-off (a ``Retry-After`` header is honoured, up to ``max_backoff``);
a caption still failing after ``retries`` retries is left undone (counted; the next run asks
again). Any other 4xx (a wrong key, model or URL) stops the run at once: it is the same for every
caption.

Resuming: both files are appended to, one whole line per write. A rerun reads them first: the
captions already in either are skipped, and a torn last line (the process killed in mid-write) is
cut off and its caption asked again. A line that is not this tool's, or whose caption is not the
one at its line of the captions file, stops the run (another captions file) before any request.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import email.utils
import json
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from jip2p import files
from jip2p.errors import ConfigError, InputError, OutputError, ServerError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_EXAMPLES = os.path.join(REPO, "data", "prompt-examples.jsonl")
REJECTED_SUFFIX = ".rejected.jsonl"
CAPTION_KEYS = ("caption", "input", "text")
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_REPLY_CHARS = 2000  # of a rejected reply, kept in the rejected file
LINE_START = b'{"input": '  # how every line of both output files begins

SYSTEM_PROMPT = (
    "You write image-editing instructions. Given the caption of an image, invent one "
    "interesting edit to that image and write it as a short imperative instruction, then write "
    "the caption of the edited image: the input caption changed only as the edit requires. Vary "
    "the kind of edit: change the style, season, weather, time of day, material, colour or "
    "medium; add, remove or replace an object; change what a person or animal is doing. Answer "
    'with one JSON object and nothing else: {"edit": "<instruction>", "output": "<edited '
    'caption>"}.')


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Example:
  """One human-written triplet in the paper's format."""

  input: str
  edit: str
  output: str


def read_examples(path: str) -> list[Example]:
  """The few-shot examples of a JSONL file (keys ``input`` or ``caption``, ``edit``, ``output``;
  others ignored). Human-written and small, so any unusable line is an `InputError` naming it."""
  examples = []
  for n, line in enumerate(files.read_lines(path, "examples file"), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      raise InputError(f"{path}: line {n} is not JSON") from None
    if isinstance(row, dict) and "input" not in row and "caption" in row:
      row["input"] = row["caption"]
    if not (isinstance(row, dict) and all(isinstance(row.get(k), str) and row[k].strip()
                                          for k in ("input", "edit", "output"))):
      raise InputError(f"{path}: line {n} is not an object with non-empty input, edit and "
                       "output strings")
    examples.append(Example(row["input"].strip(), row["edit"].strip(), row["output"].strip()))
  if not examples:
    raise InputError(f"{path}: no examples (one JSON object per line: input, edit, output)")
  return examples


@dataclasses.dataclass
class Captions:
  """The captions to ask for, by 0-based line number, and what was left out of them."""

  by_index: dict[int, str]
  lines: int
  duplicates: int  # lines whose caption an earlier line has (asked once)
  empty: int  # blank captions, or JSONL lines without a caption


def read_captions(path: str, limit: int | None = None) -> Captions:
  """Captions from a text file (one per line) or, for a ``.jsonl`` file, JSON objects with a
  ``caption``, ``input`` or ``text`` string (e.g. a LAION metadata export). ``limit``: only the
  first that many lines. A JSONL line that is not JSON is an `InputError` naming it."""
  lines = files.read_lines(path, "captions file")
  if limit is not None:
    lines = lines[:limit]
  jsonl = path.endswith(".jsonl")
  by_index, seen, duplicates, empty = {}, set(), 0, 0
  for index, line in enumerate(lines):
    caption = line
    if jsonl:
      if not line.strip():
        empty += 1
        continue
      try:
        row = json.loads(line)
      except ValueError:
        raise InputError(f"{path}: line {index + 1} is not JSON") from None
      caption = next((row[k] for k in CAPTION_KEYS if isinstance(row, dict)
                      and isinstance(row.get(k), str)), "")
    caption = " ".join(caption.split())
    if not caption:
      empty += 1
      continue
    key = normalize(caption)
    if key in seen:
      duplicates += 1
      continue
    seen.add(key)
    by_index[index] = caption
  if not by_index:
    raise InputError(f"{path}: no caption in its {len(lines)} lines")
  return Captions(by_index, len(lines), duplicates, empty)


def normalize(text: str) -> str:
  """What two captions must share to count as one: case, spacing and a final full stop ignored."""
  return " ".join(text.split()).casefold().rstrip(".").strip()


# ----------------------------------------------------------------------------- the request


def few_shot_messages(caption: str, examples: Sequence[Example], shots: int,
                      rng: random.Random) -> list[dict[str, str]]:
  """The chat: the task, ``shots`` examples (drawn by ``rng``) as earlier user/assistant turns,
  then ``caption``."""
  chosen = rng.sample(list(examples), min(shots, len(examples)))
  messages = [{"role": "system", "content": SYSTEM_PROMPT}]
  for example in chosen:
    messages.append({"role": "user", "content": example.input})
    messages.append({"role": "assistant",
                     "content": json.dumps({"edit": example.edit, "output": example.output})})
  messages.append({"role": "user", "content": caption})
  return messages


class MalformedReply(ValueError):
  """The server's answer, or the model's text in it, is not what was asked for."""


def parse_reply(content: str) -> tuple[str, str]:
  """(edit, output) from the model's text: a JSON object with string ``edit`` and ``output``,
  alone or inside a code fence or other text; `MalformedReply` otherwise."""
  start, end = content.find("{"), content.rfind("}")
  if start < 0 or end < start:
    raise MalformedReply("no JSON object in the reply")
  try:
    row = json.loads(content[start:end + 1])
  except ValueError:
    raise MalformedReply("the reply's object is not valid JSON") from None
  if not (isinstance(row, dict) and isinstance(row.get("edit"), str)
          and isinstance(row.get("output"), str)):
    raise MalformedReply("the reply's object lacks edit and output strings")
  return " ".join(row["edit"].split()), " ".join(row["output"].split())


def check_triplet(caption: str, edit: str, output: str, max_edit_words: int) -> str | None:
  """The paper's filters on one reply: the reason to drop it, or None to keep it."""
  if not edit:
    return "empty edit"
  if len(edit.split()) > max_edit_words:
    return "overlong edit"
  if not output:
    return "empty output"
  if normalize(output) == normalize(caption):
    return "output equals input"
  return None


class RequestRefused(ServerError):
  """A 4xx other than 408/429: a wrong key, model or URL, the same for every caption."""


class _Retryable(Exception):
  """(reason, seconds the server asked to wait or None)."""


class ChatClient:
  """An OpenAI-compatible ``chat/completions`` endpoint, with retries; thread-safe.

  url: the API base (``http://host:8000/v1``) or the full ``…/chat/completions`` address.
  """

  def __init__(self, url: str, model: str, api_key: str | None = None, *,
               temperature: float = 0.7, max_tokens: int = 256, timeout: float = 60.0,
               retries: int = 6, backoff: float = 1.0, max_backoff: float = 60.0):
    if not re.match(r"https?://[^/]", url or ""):
      raise ConfigError(f"the LLM server URL must start with http:// or https://, got {url!r}")
    if not model:
      raise ConfigError("no LLM model named: pass --model (or set JIP2P_LLM_MODEL)")
    for name, value, least in (("timeout", timeout, 1e-3), ("backoff", backoff, 0.0),
                               ("max_backoff", max_backoff, 0.0), ("retries", retries, 0),
                               ("max_tokens", max_tokens, 1), ("temperature", temperature, 0.0)):
      if not value >= least:
        raise ConfigError(f"{name} must be ≥ {least}, got {value}")
    url = url.rstrip("/")
    self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
    self.model, self.api_key = model, api_key
    self.temperature, self.max_tokens = temperature, max_tokens
    self.timeout, self.retries = timeout, retries
    self.backoff, self.max_backoff = backoff, max_backoff
    self._lock = threading.Lock()
    self.retried: collections.Counter[str] = collections.Counter()  # reason → retries

  def chat(self, messages: list[dict[str, str]], seed: int | None = None) -> str:
    """The model's text for ``messages``. Retries as the module says; `ServerError` when retries
    run out or the server refuses the request; `MalformedReply` for an answer without text."""
    body = {"model": self.model, "messages": messages, "temperature": self.temperature,
            "max_tokens": self.max_tokens}
    if seed is not None:
      body["seed"] = seed
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    for attempt in range(self.retries + 1):
      try:
        return self._post(data, headers)
      except _Retryable as e:
        reason, wait = e.args
        with self._lock:
          self.retried[reason] += 1
        if attempt == self.retries:
          raise ServerError(f"{self.url}: no answer after {self.retries} retries (last: "
                            f"{reason})") from None
        delay = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
        time.sleep(delay if wait is None else min(wait, self.max_backoff))
    raise AssertionError("unreachable")

  def _post(self, data: bytes, headers: dict[str, str]) -> str:
    request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=self.timeout) as response:
        raw = response.read()
    except urllib.error.HTTPError as e:
      detail = _error_text(e)
      if e.code in RETRY_STATUSES or e.code >= 500:
        raise _Retryable(f"HTTP {e.code}", _retry_after(e.headers.get("Retry-After"))) from None
      raise RequestRefused(f"{self.url} refused the request: HTTP {e.code}{detail} (check the "
                        "URL, --model and the API key)") from None
    except (TimeoutError, socket.timeout):
      raise _Retryable("timeout", None) from None
    except (urllib.error.URLError, ConnectionError, OSError) as e:
      reason = getattr(e, "reason", e)
      if isinstance(reason, (TimeoutError, socket.timeout)):
        raise _Retryable("timeout", None) from None
      raise _Retryable(f"connection: {reason}", None) from None
    try:
      answer = json.loads(raw)
      content = answer["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
      raise MalformedReply("the server's answer is not a chat completion") from None
    if not isinstance(content, str):
      raise MalformedReply("the completion has no text")
    return content


def _error_text(e: urllib.error.HTTPError) -> str:
  try:
    text = e.read().decode("utf-8", "replace")
  except OSError:
    return ""
  try:
    text = json.loads(text)["error"]["message"]
  except (ValueError, KeyError, TypeError):
    pass
  text = " ".join(str(text).split())
  return f": {text[:200]}" if text else ""


def _retry_after(value: str | None) -> float | None:
  """Seconds a ``Retry-After`` header asks for (a number or an HTTP date); None if unreadable."""
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
  except (TypeError, ValueError):
    return None


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Report:
  """What a run did; the counts of kept and rejected captions cover earlier runs too."""

  captions: int = 0  # distinct captions
  duplicates: int = 0
  empty: int = 0
  resumed: int = 0  # captions done by earlier runs
  torn: int = 0  # torn last lines cut off
  kept: int = 0
  rejected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
  malformed: int = 0  # malformed replies (each try), this run
  requests: int = 0  # this run
  retried: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
  failed: list[int] = dataclasses.field(default_factory=list)  # caption lines left undone
  last_error: str = ""

  def summary(self) -> str:
    parts = [f"{self.captions} captions", f"{self.kept} prompts kept"]
    if self.rejected:
      parts.append("dropped " + ", ".join(f"{n} {reason}" for reason, n in
                                          sorted(self.rejected.items())))
    for count, what in ((self.duplicates, "duplicate captions skipped"),
                        (self.empty, "empty captions skipped"),
                        (self.resumed, "done by earlier runs"),
                        (self.torn, "torn last lines cut off"),
                        (self.requests, "requests"),
                        (self.malformed, "malformed replies")):
      if count:
        parts.append(f"{count} {what}")
    if self.retried:
      parts.append("retried " + ", ".join(f"{n}× {reason}" for reason, n in
                                          sorted(self.retried.items())))
    if self.failed:
      parts.append(f"{len(self.failed)} captions unanswered")
    return ", ".join(parts)


def rejected_path(out: str | os.PathLike) -> str:
  """Where the captions the filters dropped go, beside the prompts file ``out``."""
  return os.fspath(out) + REJECTED_SUFFIX


def _scan(path: str, captions: dict[int, str], what: str) -> tuple[list[dict], bool]:
  """The rows of an earlier run's file, cutting a torn last line off it; (rows, torn)."""
  if not os.path.exists(path):
    return [], False
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise InputError(f"{path}: cannot read the {what} ({e.strerror})") from None
  end = data.rfind(b"\n") + 1
  rows = []
  for n, line in enumerate(data[:end].split(b"\n")[:-1], 1):
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    index = row.get("caption_index") if isinstance(row, dict) else None
    if not isinstance(index, int) or not isinstance(row.get("input"), str):
      raise InputError(f"{path}: line {n} is not a line this tool wrote (no caption_index and "
                       "input); give another --out")
    if captions.get(index) != row["input"]:
      raise InputError(f"{path}: line {n} holds caption line {index + 1} as {row['input']!r:.80}, "
                       "which the captions file does not have there: it was written from another "
                       "captions file; give another --out")
    rows.append(row)
  tail = data[end:]
  torn = bool(tail)
  if torn:  # Cut only what can be the start of a line of ours, after every whole line was.
    if not (tail.startswith(LINE_START) or LINE_START.startswith(tail)):
      raise InputError(f"{path}: its last line is not a line this tool wrote; give another --out")
    try:
      with open(path, "r+b") as f:
        f.truncate(end)
    except OSError as e:
      raise OutputError(f"cannot cut the torn last line of {path}: {e.strerror}") from None
  return rows, torn


def write_prompts(captions: Captions, out: str | os.PathLike, client: ChatClient, examples: Sequence[Example],
                  *, shots: int = 6, max_edit_words: int = 25, malformed_retries: int = 2,
                  concurrency: int = 8, seed: int = 0,
                  progress: Callable[[Report], None] | None = None) -> Report:
  """Asks ``client`` for every caption not already in ``out`` (or its rejected file); appends
  kept triplets to ``out`` and dropped ones to ``rejected_path(out)``. Returns the `Report`; the
  captions left undone (retries ran out) are in its ``failed`` (a rerun asks again).

  seed: picks each caption's examples (and is sent with the request, plus the caption's line
  number, for servers that sample reproducibly).
  """
  for name, value, least in (("shots", shots, 1), ("max_edit_words", max_edit_words, 1),
                             ("malformed_retries", malformed_retries, 0),
                             ("concurrency", concurrency, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ConfigError(f"{name} must be an integer ≥ {least}, got {value!r}")
  out = os.fspath(out)
  report = Report(captions=len(captions.by_index), duplicates=captions.duplicates,
                  empty=captions.empty)
  rejected_file = rejected_path(out)
  kept_rows, torn_kept = _scan(out, captions.by_index, "prompts file")
  dropped_rows, torn_dropped = _scan(rejected_file, captions.by_index, "rejected file")
  report.torn = torn_kept + torn_dropped
  done = {row["caption_index"] for row in kept_rows + dropped_rows}
  report.resumed = len(done)
  report.kept = len(kept_rows)
  report.rejected.update(row.get("reason", "?") for row in dropped_rows)
  todo = [i for i in sorted(captions.by_index) if i not in done]
  lock = threading.Lock()
  retried_before = collections.Counter(client.retried)

  def ask(index: int) -> tuple[int, str, dict[str, Any], int]:
    """(caption index, "kept" | "rejected", its row, malformed replies)."""
    caption = captions.by_index[index]
    rng = random.Random(seed * 1_000_003 + index)
    malformed, reply = 0, ""
    for attempt in range(malformed_retries + 1):
      with lock:
        report.requests += 1
      try:
        reply = client.chat(few_shot_messages(caption, examples, shots, rng),
                            seed=seed + index + attempt)
        edit, output = parse_reply(reply)
      except MalformedReply as e:
        malformed += 1
        reply = reply or str(e)
        continue
      reason = check_triplet(caption, edit, output, max_edit_words)
      if reason is None:
        return index, "kept", {"input": caption, "edit": edit, "output": output,
                               "caption_index": index}, malformed
      return index, "rejected", {"input": caption, "caption_index": index, "reason": reason,
                                 "edit": edit, "output": output}, malformed
    return index, "rejected", {"input": caption, "caption_index": index,
                               "reason": "malformed reply",
                               "reply": reply[:MAX_REPLY_CHARS]}, malformed

  try:
    kept_f = open(out, "ab")
    dropped_f = open(rejected_file, "ab")
  except OSError as e:
    raise OutputError(f"cannot write {out}: {e.strerror}") from None
  fatal: ServerError | None = None
  failing = 0  # captions in a row whose retries ran out
  clean = False  # the loop ended without an exception or a fatal error
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)
  try:
    pending = iter(todo)
    running: dict[concurrent.futures.Future, int] = {}

    def submit() -> None:
      while fatal is None and len(running) < 2 * concurrency:
        index = next(pending, None)
        if index is None:
          return
        running[pool.submit(ask, index)] = index

    submit()
    while running:
      finished, _ = concurrent.futures.wait(running,
                                            return_when=concurrent.futures.FIRST_COMPLETED)
      for future in finished:
        index = running.pop(future)
        try:
          index, kind, row, malformed = future.result()
        except ServerError as e:
          report.failed.append(index)
          report.last_error = str(e)
          failing += 1
          if fatal is None and (isinstance(e, RequestRefused) or failing >= 2 * concurrency):
            fatal = e
          continue
        failing = 0
        report.malformed += malformed
        target = kept_f if kind == "kept" else dropped_f
        _append(target, row, out if kind == "kept" else rejected_file)
        if kind == "kept":
          report.kept += 1
        else:
          report.rejected[row["reason"]] += 1
        if progress is not None:
          progress(report)
      submit()
    clean = fatal is None
  finally:
    # Requests still in flight after a fatal error or an interrupt are abandoned, not awaited.
    pool.shutdown(wait=clean, cancel_futures=True)
    report.retried = client.retried - retried_before
    for f in (kept_f, dropped_f):
      try:
        f.flush()
        os.fsync(f.fileno())
      except OSError:
        pass
      f.close()
  if fatal is not None:
    if isinstance(fatal, RequestRefused):
      raise fatal
    raise ServerError(f"{failing} captions in a row got no answer, so the run stopped "
                      f"({fatal}); {report.kept} prompts kept so far: rerun the same command "
                      "once the server answers")
  report.failed.sort()
  return report


def _append(f, row: dict[str, Any], path: str) -> None:
  """One whole line per write call, flushed: a kill can tear only the last line."""
  try:
    f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    f.flush()
  except OSError as e:
    raise OutputError(f"cannot write {path}: {e.strerror}") from None
