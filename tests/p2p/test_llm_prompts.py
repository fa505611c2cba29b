"""`jip2p-prompts` and `jip2p.p2p.llm_prompts` against a real OpenAI-compatible stand-in server.

The server (a `ThreadingHTTPServer` on 127.0.0.1, started here) answers ``chat/completions`` from
canned completions chosen by the caption in the last user message: slow replies, 429s with
Retry-After, 500s, 503s that never end, a first reply slower than the client's timeout,
malformed replies (no JSON, JSON without the keys, a broken first answer), a code fence, and
replies the paper's filters drop. It counts the requests per caption, so the tests see what a
rerun asks again.
"""

from __future__ import annotations

import collections
import http.server
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from jip2p.errors import ConfigError, InputError, ServerError
from jip2p.p2p import llm_prompts

REPO = pathlib.Path(__file__).resolve().parents[2]
KEY = "test-key"
MODEL = "stand-in-7b"


class StandIn(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self, delay: float = 0.0):
    super().__init__(("127.0.0.1", 0), Handler)
    self.delay = delay  # seconds before every answer
    self.requests: collections.Counter[str] = collections.Counter()
    self.lock = threading.Lock()
    self.bodies: list[dict] = []
    self.status_for_all: int | None = None  # answer every request with this status

  def handle_error(self, request, client_address):
    """Quiet about clients that hung up (the timed-out request, the killed run)."""
    if not isinstance(sys.exc_info()[1], ConnectionError):
      super().handle_error(request, client_address)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(http.server.BaseHTTPRequestHandler):
  server: StandIn

  def log_message(self, *args):  # quiet
    pass

  def _send(self, status: int, body: dict | str, headers: dict[str, str] | None = None):
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.end_headers()
    self.wfile.write(data)

  def do_POST(self):
    s = self.server
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    if self.path != "/v1/chat/completions":
      return self._send(404, {"error": {"message": f"no route {self.path}"}})
    if self.headers.get("Authorization") != f"Bearer {KEY}":
      return self._send(401, {"error": {"message": "Incorrect API key provided"}})
    if body.get("model") != MODEL:
      return self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not "
                                                   "exist"}})
    caption = body["messages"][-1]["content"]
    with s.lock:
      s.requests[caption] += 1
      n = s.requests[caption]
      s.bodies.append(body)
    if s.status_for_all is not None:
      return self._send(s.status_for_all, {"error": {"message": "overloaded"}})
    time.sleep(s.delay)
    if "ratelimited" in caption and n <= 2:
      return self._send(429, {"error": {"message": "rate limit"}}, {"Retry-After": "0"})
    if "flaky" in caption and n == 1:
      return self._send(500, "Internal Server Error")
    if "unavailable" in caption:
      return self._send(503, {"error": {"message": "overloaded"}})
    if "sleepy" in caption and n == 1:
      time.sleep(1.5)  # past the client's timeout
    content = json.dumps({"edit": "make it blue", "output": f"{caption}, painted blue"})
    if "garbled" in caption:
      content = "Sure! Here is an edit: make it blue."
    elif "keyless" in caption:
      content = json.dumps({"instruction": "make it blue"})
    elif "stutter" in caption and n == 1:
      content = '{"edit": "make it blue", "output": '
    elif "fenced" in caption:
      content = f"```json\n{content}\n```"
    elif "unchanged" in caption:
      content = json.dumps({"edit": "keep it", "output": caption.upper() + "."})
    elif "wordy" in caption:
      content = json.dumps({"edit": " ".join(["very"] * 30) + " blue", "output": caption + "!"})
    elif "blank" in caption:
      content = json.dumps({"edit": "  ", "output": caption + "!"})
    if "notchat" in caption:
      return self._send(200, {"id": "x", "object": "chat.completion", "choices": []})
    return self._send(200, {"id": "x", "object": "chat.completion",
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": content}}]})


@pytest.fixture
def server():
  s = StandIn()
  thread = threading.Thread(target=s.serve_forever, daemon=True)
  thread.start()
  yield s
  s.shutdown()
  s.server_close()


def client(server, **kwargs) -> llm_prompts.ChatClient:
  options = dict(timeout=0.5, retries=4, backoff=0.01, max_backoff=0.05)
  options.update(kwargs)
  return llm_prompts.ChatClient(server.url, MODEL, KEY, **options)


def rows(path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


EXAMPLES = [llm_prompts.Example(f"a photo of thing {i}", f"make thing {i} red",
                                f"a photo of red thing {i}") for i in range(10)]
CAPTIONS = ["a cat on a sofa", "a ratelimited dog", "a flaky horse", "a sleepy owl",
            "a garbled tree", "a keyless car", "a stutter boat", "a fenced house",
            "an unchanged lake", "a wordy bridge", "a blank road", "A cat on a  sofa.",
            "", "a notchat bird"]


def test_one_run_keeps_drops_retries_and_counts(server, tmp_path):
  (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
  captions = llm_prompts.read_captions(str(tmp_path / "captions.txt"))
  assert (captions.lines, captions.duplicates, captions.empty) == (14, 1, 1)
  out = str(tmp_path / "prompts.jsonl")
  report = llm_prompts.write_prompts(captions, out, client(server), EXAMPLES, shots=3,
                                     max_edit_words=20, malformed_retries=2, concurrency=4)
  kept = {r["input"]: r for r in rows(out)}
  assert sorted(kept) == sorted(["a cat on a sofa", "a ratelimited dog", "a flaky horse",
                                 "a sleepy owl", "a stutter boat", "a fenced house"])
  assert kept["a fenced house"] == {"input": "a fenced house", "edit": "make it blue",
                                    "output": "a fenced house, painted blue", "caption_index": 7}
  dropped = {r["input"]: r["reason"] for r in rows(llm_prompts.rejected_path(out))}
  assert dropped == {"a garbled tree": "malformed reply", "a keyless car": "malformed reply",
                     "an unchanged lake": "output equals input", "a wordy bridge": "overlong edit",
                     "a blank road": "empty edit", "a notchat bird": "malformed reply"}
  assert report.kept == 6 and sum(report.rejected.values()) == 6 and not report.failed
  # garbled, keyless and notchat: 3 tries each; stutter: its first reply.
  assert report.malformed == 3 * 3 + 1
  assert report.retried == {"HTTP 429": 2, "HTTP 500": 1, "timeout": 1}
  assert server.requests["A cat on a  sofa."] == 0  # the duplicate was not asked
  assert report.requests == sum(server.requests.values()) - 2 - 1 - 1  # retries are not asks
  # The request: the task, 3 examples as earlier turns, then the caption.
  body = server.bodies[0]
  roles = [m["role"] for m in body["messages"]]
  assert roles == ["system"] + ["user", "assistant"] * 3 + ["user"]
  shown = json.loads(body["messages"][2]["content"])
  assert set(shown) == {"edit", "output"} and body["model"] == MODEL
  # What jip2p-generate reads: every kept line is a usable prompt.
  from jip2p.p2p import dataset
  prompts, prompt_report = dataset.read_prompts(pathlib.Path(out).read_text().splitlines())
  assert len(prompts) == 6 and not prompt_report.skipped


def test_rerun_asks_only_what_is_missing_and_cuts_a_torn_line(server, tmp_path):
  names = [f"a picture number {i}" for i in range(12)]
  (tmp_path / "captions.txt").write_text("\n".join(names) + "\n")
  captions = llm_prompts.read_captions(str(tmp_path / "captions.txt"))
  out = tmp_path / "prompts.jsonl"
  first = llm_prompts.write_prompts(captions, str(out), client(server), EXAMPLES, concurrency=3)
  assert first.kept == 12 and first.resumed == 0
  lines = out.read_text().splitlines()
  torn_caption = json.loads(lines[-1])["input"]
  out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:17])  # killed in mid-write
  again = llm_prompts.write_prompts(captions, str(out), client(server), EXAMPLES, concurrency=3)
  assert (again.resumed, again.torn, again.kept, again.requests) == (11, 1, 12, 1)
  assert server.requests[torn_caption] == 2
  assert sorted(r["caption_index"] for r in rows(out)) == list(range(12))
  # A file this tool did not write is refused, and left as it was.
  foreign = tmp_path / "notes.txt"
  foreign.write_text("my notes, without a final newline")
  with pytest.raises(InputError, match="not a line this tool wrote"):
    llm_prompts.write_prompts(captions, str(foreign), client(server), EXAMPLES)
  assert foreign.read_text() == "my notes, without a final newline"
  # Another captions file is refused before any request.
  (tmp_path / "other.txt").write_text("something else\n" * 3)
  with pytest.raises(InputError, match="another captions file"):
    llm_prompts.write_prompts(llm_prompts.read_captions(str(tmp_path / "other.txt")), str(out),
                              client(server), EXAMPLES)


def test_unanswered_captions_are_left_for_the_next_run(server, tmp_path):
  (tmp_path / "captions.txt").write_text("a cat\nan unavailable dog\na bird\n")
  captions = llm_prompts.read_captions(str(tmp_path / "captions.txt"))
  out = str(tmp_path / "prompts.jsonl")
  report = llm_prompts.write_prompts(captions, out, client(server, retries=2), EXAMPLES)
  assert report.failed == [1] and report.kept == 2
  assert report.retried == {"HTTP 503": 3} and server.requests["an unavailable dog"] == 3
  assert llm_prompts.rejected_path(out) and not rows(llm_prompts.rejected_path(out))
  # A server that answers nothing stops the run, without asking for every caption.
  server.status_for_all = 503
  (tmp_path / "many.txt").write_text("".join(f"caption {i}\n" for i in range(40)))
  with pytest.raises(ServerError, match="in a row got no answer"):
    llm_prompts.write_prompts(llm_prompts.read_captions(str(tmp_path / "many.txt")),
                              str(tmp_path / "many.jsonl"), client(server, retries=1), EXAMPLES,
                              concurrency=2)
  assert sum(server.requests[f"caption {i}"] for i in range(40)) < 40


def test_a_refusal_stops_the_run_at_once(server, tmp_path):
  (tmp_path / "captions.txt").write_text("".join(f"caption {i}\n" for i in range(30)))
  captions = llm_prompts.read_captions(str(tmp_path / "captions.txt"))
  wrong_key = llm_prompts.ChatClient(server.url, MODEL, "nope", retries=3, backoff=0.01)
  with pytest.raises(ServerError, match="HTTP 401: Incorrect API key provided"):
    llm_prompts.write_prompts(captions, str(tmp_path / "p.jsonl"), wrong_key, EXAMPLES,
                              concurrency=2)
  wrong_model = llm_prompts.ChatClient(server.url, "gpt-9", KEY, retries=3, backoff=0.01)
  with pytest.raises(ServerError, match="HTTP 404: The model `gpt-9` does not exist"):
    llm_prompts.write_prompts(captions, str(tmp_path / "p.jsonl"), wrong_model, EXAMPLES)


def test_replies_inputs_and_filters():
  assert llm_prompts.parse_reply('Here: {"edit": " add  a hat", "output": "a man in a hat"} ok') \
      == ("add a hat", "a man in a hat")
  for bad in ("no object", '{"edit": 1, "output": "x"}', "{not json}", '["edit", "output"]'):
    with pytest.raises(llm_prompts.MalformedReply):
      llm_prompts.parse_reply(bad)
  check = llm_prompts.check_triplet
  assert check("a dog", "make it a cat", "a cat", 5) is None
  assert check("a dog", "make it a cat", "A  Dog.", 5) == "output equals input"
  assert check("a dog", "one two three four five six", "a cat", 5) == "overlong edit"
  assert check("a dog", "", "a cat", 5) == "empty edit"
  assert check("a dog", "make it nothing", "", 5) == "empty output"
  with pytest.raises(ConfigError, match="http:// or https://"):
    llm_prompts.ChatClient("localhost:8000", MODEL)
  with pytest.raises(ConfigError, match="--model"):
    llm_prompts.ChatClient("http://localhost:8000/v1", "")


def test_captions_from_jsonl_and_shipped_examples(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text('{"caption": "a cat"}\n{"TEXT": "x", "text": "a dog"}\n{"url": "u"}\n\n'
                  '{"input": "a cat"}\n')
  captions = llm_prompts.read_captions(str(path))
  assert captions.by_index == {0: "a cat", 1: "a dog"}
  assert (captions.empty, captions.duplicates) == (2, 1)
  path.write_text('{"caption": "a cat"}\nnot json\n')
  with pytest.raises(InputError, match="line 2 is not JSON"):
    llm_prompts.read_captions(str(path))
  examples = llm_prompts.read_examples(llm_prompts.DEFAULT_EXAMPLES)
  assert len(examples) >= 20
  assert all(llm_prompts.check_triplet(e.input, e.edit, e.output, 25) is None for e in examples)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"input": "a", "edit": "b", "output": "c"}\n{"input": "a", "edit": ""}\n')
  with pytest.raises(InputError, match="line 2"):
    llm_prompts.read_examples(str(bad))


# ----------------------------------------------------------------------------- the console script


def _cli(*args: str) -> list[str]:
  return [sys.executable, "-m", "jip2p.cli.prompts", *args]


def _env(**extra) -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=str(REPO), JIP2P_LLM_API_KEY=KEY)
  env.pop("OPENAI_API_KEY", None)
  env.update(extra)
  return env


def test_cli_resumes_after_kill_9_without_duplicates(server, tmp_path):
  server.delay = 0.1
  names = [f"caption number {i}" for i in range(60)] + ["a garbled thing", "an unchanged thing",
                                                         "caption number 3"]
  (tmp_path / "captions.txt").write_text("\n".join(names) + "\n")
  out = tmp_path / "prompts.jsonl"
  command = _cli("--captions", str(tmp_path / "captions.txt"), "--out", str(out), "--url",
                 server.url, "--model", MODEL, "--concurrency", "3", "--backoff", "0.01",
                 "--timeout", "5")
  process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=REPO)
  deadline = time.time() + 120
  while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 10):
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  before = out.read_text().count("\n")
  assert 10 <= before < 60, "the run was not killed in the middle"
  with open(out, "ab") as f:  # what a kill in mid-write leaves
    f.write(b'{"input": "caption number 59", "ed')
  asked_before = collections.Counter(server.requests)

  done = subprocess.run(command, env=_env(), capture_output=True, text=True, cwd=REPO,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  kept, dropped = rows(out), rows(llm_prompts.rejected_path(out))
  indices = [r["caption_index"] for r in kept + dropped]
  assert sorted(indices) == list(range(62))  # every caption once; the duplicate line 63 never
  assert {r["input"]: r["reason"] for r in dropped} == {"a garbled thing": "malformed reply",
                                                      "an unchanged thing": "output equals input"}
  summary = [line for line in done.stdout.splitlines() if line.startswith("jip2p-prompts:")]
  assert summary and "62 captions, 60 prompts kept" in summary[0], done.stdout
  assert "1 duplicate captions skipped" in summary[0] and "1 torn last lines" in summary[0]
  # The rerun asked only for captions without a whole line (the ones in flight at the kill).
  finished = {r["input"] for r in kept[:before]}
  assert all(server.requests[c] == asked_before[c] for c in finished)
  assert all(server.requests[c] >= 1 for c in names)

  # A third run has nothing to ask.
  requests = sum(server.requests.values())
  again = subprocess.run(command, env=_env(), capture_output=True, text=True, cwd=REPO,
                         timeout=300)
  assert again.returncode == 0 and sum(server.requests.values()) == requests
  assert "62 done by earlier runs" in again.stdout


def test_cli_errors_are_one_line(server, tmp_path):
  from tests.cli_errors import named_error
  captions = tmp_path / "captions.txt"
  captions.write_text("a cat\nan unavailable dog\n")
  out = tmp_path / "p.jsonl"
  base = ["--captions", str(captions), "--out", str(out), "--url", server.url, "--backoff",
          "0.01", "--retries", "1"]
  cases = [
      (_cli(*base), _env(JIP2P_LLM_MODEL=""), "no LLM model named"),
      (_cli(*base, "--model", MODEL), _env(JIP2P_LLM_API_KEY="wrong"), "HTTP 401"),
      (_cli(*base, "--model", MODEL, "--examples", str(captions)), _env(), "line 1 is not JSON"),
      (_cli(*base[:3], str(tmp_path), *base[4:], "--model", MODEL), _env(), "is a folder"),
      (_cli(*base, "--model", MODEL), _env(),
       "1 captions got no answer (first at line 2; "),
  ]
  for command, env, message in cases:
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert message in named_error(done.stderr, done.returncode, "jip2p-prompts"), done.stderr
  assert [r["input"] for r in rows(out)] == ["a cat"]
  helped = subprocess.run(_cli("--help"), env=_env(), capture_output=True, text=True, cwd=REPO)
  assert helped.returncode == 0 and "chat/completions" in helped.stdout
