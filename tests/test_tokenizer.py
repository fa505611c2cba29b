"""jip2p.tokenizer against transformers' CLIPTokenizer and open_clip's SimpleTokenizer.

The vocabulary is the real 49408-token CLIP one: `CLIPTokenizer.default()` rebuilds it from the
open_clip wheel and `write_folder` hands it to transformers.
"""

import json
import pathlib
import pickle
import random
import subprocess
import sys
import unicodedata

import numpy as np
import open_clip
import pytest
import transformers

from jip2p import tokenizer as tk
from jip2p.errors import CheckpointError, ConfigError, InputError

# Strings on which all three normalisations agree.
HARD = [
    "",
    "make it a watercolor painting",
    "Café naïve résumé Ångström Zoë",
    "東京の夜景を描いて 北京烤鸭 한국어",
    "مرحبا بالعالم، اجعلها ليلية",
    "नमस्ते दुनिया",
    "🐱🔥 make it 🌈 rainbow 👍🏽 👨‍👩‍👧",
    " ".join(["turn the red car into a blue bicycle"] * 12),
    "!!!??? ... ,,, --- *** ((())) $$$ #@%^&",
    "MaKe It LoOk LiKe VAN GOGH's StArRy NiGhT",
    "1234567 3.14159 1,000,000 2nd 42nd 1920s",
    "a   b\t\tc\n\n d  \r\n e\u00a0f\u3000g",
    "it's can't they're we've I'm you'll he'd IT'S DON'T ''s 's's",
    "line one\nline two\nline three",
    "Σίσυφος İstanbul straße ΑΣΑ",
    "e\u0301 combining and zero\u200bwidth",
    "put a <|endoftext|> sign on the wall",
]
# Strings that CLIP's cleaning (ftfy, HTML unescaping, str.lower's final sigma) or its
# case-insensitive pattern (U+0345 folds to a letter) treat unlike transformers' backend.
CLIP_CLEANING_CHANGES = [
    "Tom &amp; Jerry &lt;3 &quot;hi&quot; &#39;x&#39; caf&eacute;",
    "<b>AT&amp;amp;T</b>",  # ftfy leaves entities near tags; CLIP unescapes twice.
    "“curly” ‘quotes’ don’t",
    "ﬁne ﬂowers",
    "ＦＵＬＬ　ＷＩＤＴＨ １２３",
    "Ã©tÃ© mojibake",
    "bell\x07 and\x1f unit",
    "ΟΔΟΣ",
    "x\u0345y",
]


def _hf_ids(hf, texts):
  return np.array(
      hf(list(texts), padding="max_length", max_length=77, truncation=True).input_ids, np.int32)


def _eos_padded(ids):
  """open_clip pads with 0, SD 1.x with eos: rewrites everything after the first eos as eos."""
  ids = np.asarray(ids, np.int32)
  return np.where(np.cumsum(ids == 49407, axis=1) > 0, 49407, ids).astype(np.int32)


def _random_strings(n, seed):
  rng = random.Random(seed)
  pieces = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'\"&;#-")
  pieces += ["&amp;", "&lt;", "  ", "\t", "\n", "'s", "'LL", "’", "é", "ß", "中", "🐱", "ﬁ",
             "Σ"]
  out = []
  for _ in range(n):
    chars = []
    for _ in range(rng.randint(0, 40)):
      r = rng.random()
      if r < 0.6:
        chars.append(rng.choice(pieces))
      else:
        c = rng.randint(0x80, 0x1FAFF)
        if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn":
          chars.append(chr(c))
    out.append("".join(chars))
  return out


@pytest.fixture(scope="module")
def ours():
  return tk.CLIPTokenizer.default()


@pytest.fixture(scope="module")
def folder(ours, tmp_path_factory):
  path = tmp_path_factory.mktemp("model") / "tokenizer"
  ours.write_folder(path)
  return path


@pytest.fixture(scope="module")
def hf(folder):
  return transformers.CLIPTokenizer.from_pretrained(str(folder))


def test_default_vocabulary_is_clips(ours):
  oc = open_clip.tokenizer.SimpleTokenizer()
  renamed = {"<start_of_text>": tk.BOS_TOKEN, "<end_of_text>": tk.EOS_TOKEN}
  assert ours.vocab == {renamed.get(t, t): i for t, i in oc.encoder.items()}
  assert len(ours.vocab) == 49408 and len(ours.merges) == 48894
  assert (ours.vocab["!"], ours.bos_id, ours.eos_id, ours.pad_id) == (0, 49406, 49407, 49407)
  assert ours.max_length == 77


def test_written_folder_is_read_back_by_transformers(folder, hf):
  assert hf.get_vocab() == json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
  assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (49406, 49407, 49407)
  assert hf.model_max_length == 77


@pytest.mark.parametrize("normalization", ["ftfy", "nfc"])
def test_matches_transformers_on_hard_strings(ours, folder, hf, normalization):
  tok = tk.CLIPTokenizer.from_folder(folder, normalization)
  got = tok(HARD)
  assert got.dtype == np.int32 and got.shape == (len(HARD), 77)
  np.testing.assert_array_equal(got, _hf_ids(hf, HARD))
  np.testing.assert_array_equal(ours(HARD), got)


def test_nfc_matches_transformers_where_clip_cleaning_changes_the_text(folder, hf):
  ftfy_tok = tk.CLIPTokenizer.from_folder(folder)
  nfc_tok = tk.CLIPTokenizer.from_folder(folder, "nfc")
  want = _hf_ids(hf, CLIP_CLEANING_CHANGES)
  np.testing.assert_array_equal(nfc_tok(CLIP_CLEANING_CHANGES), want)
  assert all((ftfy_tok(CLIP_CLEANING_CHANGES) != want).any(axis=1))  # Each string really is a case.


def test_nfc_matches_transformers_on_random_strings(folder, hf):
  texts = _random_strings(400, seed=0)
  np.testing.assert_array_equal(tk.CLIPTokenizer.from_folder(folder, "nfc")(texts),
                                _hf_ids(hf, texts))


def test_nfc_matches_transformers_on_assigned_code_points(folder, hf):
  """Every 5th code point assigned in Python's Unicode tables, inside a word and alone."""
  tok = tk.CLIPTokenizer.from_folder(folder, "nfc")
  chars = [chr(c) for c in range(0x80, 0x110000, 5)
           if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
  texts = [f"x{c}Y {c}" for c in chars]
  want = hf(texts, add_special_tokens=False).input_ids
  bad = [c for c, t, w in zip(chars, texts, want) if tok.encode(t) != w]
  assert len(texts) > 50_000 and not bad, [hex(ord(c)) for c in bad[:20]]


def test_matches_open_clip(ours):
  # open_clip names its specials <start_of_text>, <end_of_text>: "<|endoftext|>" is text there.
  texts = [t for t in HARD + CLIP_CLEANING_CHANGES if "<|endoftext|>" not in t]
  texts += _random_strings(400, seed=1)
  np.testing.assert_array_equal(ours(texts), _eos_padded(open_clip.tokenize(texts).numpy()))
  oc = open_clip.tokenizer.SimpleTokenizer()
  assert all(ours.encode(t) == oc.encode(t) for t in texts)


def test_matches_open_clip_on_assigned_code_points(ours):
  """Every 13th code point assigned in Python's Unicode tables, inside a word and alone."""
  oc = open_clip.tokenizer.SimpleTokenizer()
  chars = [chr(c) for c in range(0x80, 0x110000, 13)
           if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
  bad = [c for c in chars if ours.encode(f"x{c}Y {c}") != oc.encode(f"x{c}Y {c}")]
  assert len(chars) > 20_000 and not bad, [hex(ord(c)) for c in bad[:20]]


def test_truncation_keeps_eos_last(ours):
  text = HARD[7]
  ids = ours.encode(text)
  assert len(ids) > 75
  row = ours([text])[0]
  assert row[0] == ours.bos_id and row[-1] == ours.eos_id
  np.testing.assert_array_equal(row[1:76], ids[:75])
  empty = ours([""])[0]
  assert empty[0] == ours.bos_id and (empty[1:] == ours.eos_id).all()


def test_sd2_folder_pads_with_zero(ours, tmp_path):
  tk.CLIPTokenizer(ours.vocab, ours.merges, pad_token="!").write_folder(tmp_path / "tokenizer")
  sd2 = tk.load_tokenizer(tmp_path)
  hf2 = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
  assert sd2.pad_id == hf2.pad_token_id == 0
  texts = [t for t in HARD if "!" not in t]
  got = sd2(texts)
  np.testing.assert_array_equal(got, _hf_ids(hf2, texts))
  assert (got[0, 2:] == 0).all()
  # transformers turns each "!" into the pad token; SD 2.x was trained with open_clip's ids.
  bangs = ["make it snow!", "wow!! so ! cool"]
  np.testing.assert_array_equal(sd2(bangs), open_clip.tokenize(bangs).numpy())
  assert (_hf_ids(hf2, bangs) != sd2(bangs)).any()


def test_reads_the_tokenizer_json_transformers_5_saves(hf, ours, tmp_path):
  hf.save_pretrained(str(tmp_path))
  assert not (tmp_path / "vocab.json").exists()
  tok = tk.CLIPTokenizer.from_folder(tmp_path)
  assert tok.vocab == ours.vocab and tok.merges == ours.merges
  np.testing.assert_array_equal(tok(HARD), ours(HARD))


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_missing_file_raises_checkpoint_error(folder, tmp_path, missing):
  for f in folder.iterdir():
    if f.name != missing:
      (tmp_path / f.name).write_bytes(f.read_bytes())
  with pytest.raises(CheckpointError, match=missing):
    tk.load_tokenizer(tmp_path)
  with pytest.raises(CheckpointError, match="does not exist"):
    tk.load_tokenizer(tmp_path / "nowhere")


def test_bad_config_and_inputs_raise(folder, ours, tmp_path):
  for f in folder.iterdir():
    (tmp_path / f.name).write_bytes(f.read_bytes())
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 1e30}))
  with pytest.raises(ConfigError, match="model_max_length"):
    tk.CLIPTokenizer.from_folder(tmp_path)
  with pytest.raises(ConfigError, match="normalization"):
    tk.load_tokenizer(folder, normalization="nfkc")
  with pytest.raises(CheckpointError, match="pad token"):
    tk.CLIPTokenizer(ours.vocab, ours.merges, pad_token="<pad>")
  with pytest.raises(InputError, match="one string"):
    ours("a cat")
  with pytest.raises(InputError, match="not UTF-8"):
    ours.encode(b"\xff\xfe")


def test_bytes_pickle_and_load_tokenizer(ours, folder):
  texts = ["Make it snow", "ΟΔΟΣ 東京 🐱"]
  np.testing.assert_array_equal(ours([t.encode() for t in texts]), ours(texts))
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(ours))(texts), ours(texts))
  np.testing.assert_array_equal(tk.load_tokenizer()(texts), ours(texts))
  np.testing.assert_array_equal(tk.load_tokenizer(folder.parent)(texts), ours(texts))


def test_imports_neither_torch_tensorflow_nor_transformers():
  code = ("import sys; from jip2p.tokenizer import load_tokenizer; load_tokenizer()(['a cat']);"
          "print(sorted(m for m in ('torch', 'tensorflow', 'transformers', 'open_clip')"
          " if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=pathlib.Path(__file__).parents[1])
  assert out.stdout.strip() == "[]"
