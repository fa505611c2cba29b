"""CLIP's byte-level BPE tokenizer in pure Python: neither torch, TensorFlow nor transformers.

The JAX trainer/editor and the tf.data reader both tokenize, and torch and TensorFlow must not share
a process, so this module imports neither. Its ids equal transformers' `CLIPTokenizer` and
open_clip's `SimpleTokenizer` (tests/test_tokenizer.py checks both on hard strings).

Sources of the vocabulary:
  * a model folder's `tokenizer/` as transformers writes it (`vocab.json` + `merges.txt`, or the
    `tokenizer.json` that transformers 5 saves), with `tokenizer_config.json` /
    `special_tokens_map.json` giving the pad token (SD 1.x pads with `<|endoftext|>` = 49407,
    SD 2.x with `!` = 0) and `model_max_length` (77);
  * offline, `CLIPTokenizer.default()`: the same 49408-token vocabulary rebuilt from the CLIP merges
    file inside the open_clip_torch wheel, read as a data file (importing open_clip imports torch).

Text normalisation, chosen per tokenizer:
  * "ftfy" (default): OpenAI CLIP's, which SD's text encoders were trained with and which
    open_clip and transformers' former Python tokenizer use: `ftfy.fix_text`, HTML unescape,
    whitespace runs to one space, lower case.
  * "nfc": transformers' tokenizers-backed `CLIPTokenizer` (the only one in transformers 5, so the
    one diffusers pipelines use): Unicode NFC, whitespace runs to one space, lower case.
The two differ only on text that ftfy repairs (HTML entities, curly quotes, ligatures, full-width
forms, mojibake, control characters), on a word-final capital sigma (`str.lower` gives ς) and on
U+0345, which CLIP's case-insensitive pattern counts as a letter.

One deliberate difference from transformers: with SD 2.x's pad token `!`, transformers also turns
every `!` in the text into the pad token (diffusers issue #4153); here `!` stays text, as in
open_clip, which SD 2.x was trained with, and only the padding is 0.
"""

from collections.abc import Mapping, Sequence
import functools
import gzip
import html
import importlib.util
import json
import math
import os
import unicodedata

import ftfy
import numpy as np
import regex

from jip2p.errors import CheckpointError, ConfigError, InputError

CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
NORMALIZATIONS = ("ftfy", "nfc")

_MERGES_HEADER = "#version: 0.2"
# The merges file lists 262,144 merges; CLIP keeps the first 49152 - 256 - 2 of them.
_NUM_CLIP_MERGES = 49152 - 256 - 2
_OPEN_CLIP_BPE = "bpe_simple_vocab_16e6.txt.gz"
_WHITESPACE = regex.compile(r"\s+")
_BPE_CACHE_SIZE = 1 << 16


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """Maps each byte to a printable character, so BPE never sees whitespace or control bytes.

  Printable Latin-1 bytes map to themselves; the other 68 take code points 256, 257, ... in byte
  order. The order of this dict is also the order of the first 256 vocabulary entries.
  """
  printable = [
      *range(ord("!"), ord("~") + 1),
      *range(ord("¡"), ord("¬") + 1),
      *range(ord("®"), ord("ÿ") + 1),
  ]
  others = [b for b in range(256) if b not in printable]
  table = {b: chr(b) for b in printable}
  table.update({b: chr(256 + n) for n, b in enumerate(others)})
  return table


def clean_text(text: str, normalization: str = "ftfy") -> str:
  """Normalises `text` as CLIP ("ftfy") or transformers' tokenizers backend ("nfc") does."""
  if normalization == "ftfy":
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()
  if normalization == "nfc":
    # tokenizers lower-cases char by char: a final capital sigma becomes σ, not str.lower's ς.
    text = unicodedata.normalize("NFC", text).replace("Σ", "σ")
    return _WHITESPACE.sub(" ", text).lower()
  raise ConfigError(f"normalization={normalization!r}: expected one of {NORMALIZATIONS}")


class CLIPTokenizer:
  """Text → CLIP token ids: `tok(texts)` gives int32 [N, max_length] with bos, eos and padding.

  Attributes: `vocab` (token → id), `merges` (pairs in rank order), `bos_id`, `eos_id`, `pad_id`,
  `unk_id`, `max_length`, `normalization`.
  """

  def __init__(
      self,
      vocab: Mapping[str, int],
      merges: Sequence[tuple[str, str]],
      *,
      bos_token: str = BOS_TOKEN,
      eos_token: str = EOS_TOKEN,
      pad_token: str = EOS_TOKEN,
      unk_token: str = EOS_TOKEN,
      max_length: int = CONTEXT_LENGTH,
      normalization: str = "ftfy",
  ):
    for role, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token),
                        ("unk", unk_token)):
      if token not in vocab:
        raise CheckpointError(f"{role} token {token!r} is not in the vocabulary")
    if normalization not in NORMALIZATIONS:
      raise ConfigError(f"normalization={normalization!r}: expected one of {NORMALIZATIONS}")
    if not isinstance(max_length, int) or not 2 <= max_length <= 1 << 16:
      raise ConfigError(
          f"model_max_length={max_length!r}: CLIP text encoders take {CONTEXT_LENGTH} tokens")
    self.vocab = dict(vocab)
    self.merges = [tuple(m) for m in merges]
    self.bos_token, self.eos_token = bos_token, eos_token
    self.pad_token, self.unk_token = pad_token, unk_token
    self.bos_id, self.eos_id = self.vocab[bos_token], self.vocab[eos_token]
    self.pad_id, self.unk_id = self.vocab[pad_token], self.vocab[unk_token]
    self.max_length = max_length
    self.normalization = normalization
    self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
    self._specials = {bos_token: self.bos_id, eos_token: self.eos_id}
    specials = "|".join(regex.escape(t) for t in self._specials)
    # CLIP matches case-insensitively, tokenizers does not; they differ on U+0345 (folds to ι).
    self._pattern = regex.compile(
        specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE if normalization == "ftfy" else 0)
    self._byte_encoder = bytes_to_unicode()
    self._word_ids = functools.lru_cache(maxsize=_BPE_CACHE_SIZE)(self._tokenize_word)

  # ---------------------------------------------------------------- construction

  @classmethod
  def default(cls, normalization: str = "ftfy") -> "CLIPTokenizer":
    """The OpenAI CLIP vocabulary (as in SD 1.x's `tokenizer/`) from open_clip's data file."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    paths = [os.path.join(d, _OPEN_CLIP_BPE) for d in locations]
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
      raise CheckpointError(
          f"no tokenizer folder was given and {_OPEN_CLIP_BPE} was not found in an installed "
          "open_clip_torch; install open_clip_torch or pass the model folder")
    with gzip.open(paths[0], "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_CLIP_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
              BOS_TOKEN, EOS_TOKEN]
    return cls({t: i for i, t in enumerate(tokens)}, merges, normalization=normalization)

  @classmethod
  def open_clip(cls) -> "CLIPTokenizer":
    """open_clip's tokenizer as a transformers one: CLIP's vocabulary, padded with "!" (id 0), as
    open_clip pads and as the tokenizer folders of SD 2.x and SDXL's ``tokenizer_2/`` say."""
    default = cls.default()
    return cls(default.vocab, default.merges, pad_token="!")

  @classmethod
  def from_folder(cls, path: str | os.PathLike, normalization: str = "ftfy") -> "CLIPTokenizer":
    """Reads a transformers tokenizer folder: `path/tokenizer/` if present, else `path` itself."""
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise CheckpointError(f"tokenizer folder {path!r} does not exist")
    if os.path.isdir(os.path.join(path, "tokenizer")):
      path = os.path.join(path, "tokenizer")
    vocab_file = os.path.join(path, "vocab.json")
    merges_file = os.path.join(path, "merges.txt")
    fast_file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(vocab_file) or not os.path.isfile(fast_file):
      for f in (vocab_file, merges_file):
        if not os.path.isfile(f):
          raise CheckpointError(f"tokenizer file {f!r} is missing (nor is there a tokenizer.json)")
      vocab = _read_json(vocab_file)
      merges = _read_merges(merges_file)
    else:
      vocab, merges = _read_tokenizer_json(fast_file)
    config = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the latter wins.
      f = os.path.join(path, name)
      if os.path.isfile(f):
        config.update(_read_json(f))
    tokens = {
        role: _token_content(config.get(f"{role}_token", default), role)
        for role, default in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", EOS_TOKEN),
                              ("unk", EOS_TOKEN))
    }
    return cls(vocab, merges, **{f"{r}_token": t for r, t in tokens.items()},
               max_length=config.get("model_max_length", CONTEXT_LENGTH),
               normalization=normalization)

  def write_folder(self, path: str | os.PathLike) -> None:
    """Writes the four files transformers' `CLIPTokenizer.from_pretrained(path)` reads."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    vocab = dict(sorted(self.vocab.items(), key=lambda kv: kv[1]))
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("\n".join([_MERGES_HEADER, *(" ".join(m) for m in self.merges)]) + "\n")
    special = {"bos_token": self.bos_token, "eos_token": self.eos_token,
               "pad_token": self.pad_token, "unk_token": self.unk_token}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length,
              "do_lower_case": True, "add_prefix_space": False, "errors": "replace", **special}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
      with open(os.path.join(path, name), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)

  # ---------------------------------------------------------------- tokenization

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """Token ids, int32 [len(texts), max_length]: bos, text (truncated), eos, then padding."""
    if isinstance(texts, (str, bytes)):
      raise InputError(f"texts must be a sequence of strings, not one string: {texts!r:.60}")
    out = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    for row, text in zip(out, texts):
      ids = self.encode(text)[:self.max_length - 2]
      row[0] = self.bos_id
      row[1:len(ids) + 1] = ids
      row[len(ids) + 1] = self.eos_id
    return out

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (str, or UTF-8 bytes as tf.data yields) without bos/eos, untruncated."""
    if isinstance(text, bytes):
      try:
        text = text.decode("utf-8")
      except UnicodeDecodeError as e:
        raise InputError(f"text {text!r:.60} is not UTF-8: {e}") from e
    if not isinstance(text, str):
      raise InputError(f"text must be a str, got {type(text).__name__}: {text!r:.60}")
    words = self._pattern.findall(clean_text(text, self.normalization))
    return [i for word in words for i in self._word_ids(word)]

  def _tokenize_word(self, word: str) -> tuple[int, ...]:
    """Ids of one pre-tokenized word: a special token, or the BPE of its byte-encoded form.

    BPE merges every occurrence of the best-ranked adjacent pair, then repeats, until no pair of
    symbols is in the merge table (OpenAI's algorithm; the last symbol carries "</w>").
    """
    special = self._specials.get(word)
    if special is not None:
      return (special,)
    chars = [self._byte_encoder[b] for b in word.encode("utf-8")]
    symbols = [*chars[:-1], chars[-1] + "</w>"]
    ranks = self._ranks
    while len(symbols) > 1:
      rank, first, second = min(
          (ranks.get(pair, math.inf), *pair) for pair in zip(symbols, symbols[1:]))
      if rank == math.inf:
        break
      merged, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    return tuple(self.vocab.get(s, self.unk_id) for s in symbols)

  def __getstate__(self):
    """Pickles without the BPE cache (an lru_cache of a bound method cannot be pickled)."""
    state = self.__dict__.copy()
    del state["_word_ids"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._word_ids = functools.lru_cache(maxsize=_BPE_CACHE_SIZE)(self._tokenize_word)


def load_tokenizer(model_dir: str | os.PathLike | None = None,
                   normalization: str = "ftfy") -> CLIPTokenizer:
  """The model folder's tokenizer if `model_dir` is given, else the offline CLIP vocabulary."""
  if model_dir is None:
    return CLIPTokenizer.default(normalization)
  return CLIPTokenizer.from_folder(model_dir, normalization)


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read tokenizer file {path!r}: {e}") from e


def _read_merges(path: str) -> list[tuple[str, str]]:
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read tokenizer file {path!r}: {e}") from e
  merges = []
  for number, line in enumerate(lines, start=1):
    if line and not (number == 1 and line.startswith("#version")):
      pair = tuple(line.split())
      if len(pair) != 2:
        raise CheckpointError(f"{path!r} line {number}: expected two symbols, got {line!r}")
      merges.append(pair)
  return merges


def _read_tokenizer_json(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Vocabulary and merges of a tokenizers-library `tokenizer.json` holding a BPE model."""
  content = _read_json(path)
  model = content.get("model") or {}
  if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
    raise CheckpointError(f"{path!r} does not hold a BPE model with vocab and merges")
  merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  vocab = dict(model["vocab"])
  for added in content.get("added_tokens", []):
    vocab.setdefault(added["content"], added["id"])
  return vocab, merges


def _token_content(token, role: str) -> str:
  """A special token as written by transformers: a string or an AddedToken dict."""
  if isinstance(token, Mapping) and isinstance(token.get("content"), str):
    return token["content"]
  if isinstance(token, str):
    return token
  raise CheckpointError(f"{role}_token {token!r} in the tokenizer config is not a token")


class SDXLTokenizers:
  """SDXL's two tokenizers as one: texts → int32 [len(texts), 2, max_length], row 0 from the
  first (CLIP ViT-L's), row 1 from the second (OpenCLIP bigG's, padded with "!"): the token ids
  `jip2p.models.clip_text.SDXLTextEncoders` reads, which a training batch carries."""

  def __init__(self, first: CLIPTokenizer, second: CLIPTokenizer):
    self.first, self.second = first, second

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    return np.stack([self.first(texts), self.second(texts)], axis=1)
