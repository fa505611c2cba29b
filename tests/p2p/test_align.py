"""Token alignment (word-swap mapper, Needleman–Wunsch refinement) against hand-worked tables.

Token counts used below (CLIP BPE): every word is one token except "hippopotamus" (hippo potam
us), "armadillo" (armad illo). Positions count bos as 0.
"""

import numpy as np
import pytest

from jip2p.errors import ConfigError, InputError
from jip2p.p2p import align
from jip2p.p2p.sampling import cross_replace_alpha, self_replace_window
from jip2p.tokenizer import CLIPTokenizer

TOK = CLIPTokenizer.default()
L = 77


def test_token_counts_the_tables_rely_on():
  assert len(TOK.encode("hippopotamus")) == 3
  assert len(TOK.encode("armadillo")) == 2
  for word in ("a", "cat", "dog", "on", "mat", "and", "painting", "watercolor", "squirrel",
               "eating", "burger", "big", "red", "car", "photo", "of"):
    assert len(TOK.encode(word)) == 1, word


@pytest.mark.parametrize("text", ["a hippopotamus on a mat", "a cat, on a mat.", "It's a dog!",
                                  "an armadillo  with two spaces"])
def test_word_spans_partition_the_tokenization(text):
  spans = align.word_token_spans(TOK, text)
  ids = TOK.encode(text)
  flat = np.concatenate(spans)
  np.testing.assert_array_equal(flat, np.arange(1, len(ids) + 1))
  words = text.split(" ")
  assert [[ids[p - 1] for p in s] for s in spans] == [TOK.encode(w) for w in words]


def test_word_token_indices():
  text = "a hippopotamus on a mat"
  np.testing.assert_array_equal(align.word_token_indices(TOK, text, "a"), [1, 6])
  np.testing.assert_array_equal(align.word_token_indices(TOK, text, "hippopotamus"), [2, 3, 4])
  np.testing.assert_array_equal(align.word_token_indices(TOK, text, 4), [7])
  assert align.word_token_indices(TOK, text, "zebra").size == 0
  with pytest.raises(InputError, match="out of range"):
    align.word_token_indices(TOK, text, 5)


def _map(rows_to_cols: dict) -> np.ndarray:
  m = np.zeros((L, L), np.float32)
  for i, cols in rows_to_cols.items():
    for j, w in cols:
      m[i, j] = w
  return m


def _shifted(start: int, stop: int, shift: int) -> dict:
  return {i: [(i + shift, 1.0)] for i in range(start, stop)}


REPLACE_TABLE = [
    # Same token counts: the identity.
    ("a cat on a mat", "a dog on a mat", _shifted(0, L, 0)),
    # One token → three: the source token spreads evenly; the rest shifts by two.
    ("a cat on a mat", "a hippopotamus on a mat",
     {0: [(0, 1.0)], 1: [(1, 1.0)], 2: [(2, 1 / 3), (3, 1 / 3), (4, 1 / 3)],
      **_shifted(3, L - 2, 2)}),
    # Three tokens → one: each source token maps wholly onto it; the rest shifts back by two.
    ("a hippopotamus on a mat", "a cat on a mat",
     {0: [(0, 1.0)], 1: [(1, 1.0)], 2: [(2, 1.0)], 3: [(2, 1.0)], 4: [(2, 1.0)],
      **_shifted(5, L, -2)}),
    # Two swaps of different lengths: shifts accumulate (+1, then +3).
    ("a cat and a dog", "a armadillo and a hippopotamus",
     {0: [(0, 1.0)], 1: [(1, 1.0)], 2: [(2, 0.5), (3, 0.5)], 3: [(4, 1.0)], 4: [(5, 1.0)],
      5: [(6, 1 / 3), (7, 1 / 3), (8, 1 / 3)], **_shifted(6, L - 3, 3)}),
]


@pytest.mark.parametrize("source,target,expected", REPLACE_TABLE)
def test_replacement_mapper(source, target, expected):
  np.testing.assert_allclose(align.replacement_mapper(TOK, source, target), _map(expected),
                             atol=1e-7)


def test_replacement_needs_the_same_number_of_words():
  with pytest.raises(InputError, match="same number of words.*has 5.*has 6"):
    align.replacement_mapper(TOK, "a cat on a mat", "a big dog on a mat")


def test_global_alignment_basics():
  assert align.global_alignment([1, 2, 3], [1, 3]) == [0, 2]
  assert align.global_alignment([1, 3], [1, 2, 3]) == [0, -1, 1]
  assert align.global_alignment([], [5, 6]) == [-1, -1]


REFINE_TABLE = [
    # The reference's own example: one word inserted.
    ("a painting of a squirrel eating a burger",
     "a watercolor painting of a squirrel eating a burger",
     [0, 1, -1, 2, 3, 4, 5, 6, 7, 8, 9]),
    # Words removed: the remaining target tokens find theirs.
    ("a big red car", "a car", [0, 1, 4, 5]),
    # A substitution: gap + gap (0) beats a mismatch (−1), so "dog" is an insertion.
    ("a cat", "a dog", [0, 1, -1, 3]),
    # A tie: the traceback prefers a gap in the source, so the *first* "cat" aligns.
    ("a cat", "a cat cat", [0, 1, 2, -1, 3]),
]


@pytest.mark.parametrize("source,target,aligned", REFINE_TABLE)
def test_refinement_mapper(source, target, aligned):
  mapper, alphas = align.refinement_mapper(TOK, source, target)
  n = len(aligned)
  expected_mapper = np.concatenate([np.maximum(aligned, 0), np.arange(n, L)])
  expected_alphas = np.concatenate([np.asarray(aligned) >= 0, np.ones(L - n)])
  np.testing.assert_array_equal(mapper, expected_mapper)
  np.testing.assert_array_equal(alphas, expected_alphas)


def test_refinement_map_matrix():
  matrix, keep = align.refinement_map(TOK, "a cat", "a dog")
  expected = np.eye(L, dtype=np.float32)
  expected[:, 2] = 0.0  # "dog" has no source: its own map is kept instead.
  np.testing.assert_array_equal(matrix, expected)
  np.testing.assert_array_equal(keep, np.eye(L)[2])


def test_equalizer():
  eq = align.equalizer(TOK, "a photo of a cat", {"cat": 2.0, "a": 0.5})
  expected = np.ones(L, np.float32)
  expected[5], expected[[1, 4]] = 2.0, 0.5
  np.testing.assert_array_equal(eq, expected)
  np.testing.assert_array_equal(align.equalizer(TOK, "a photo of a cat", {2: 3.0})[3], 3.0)
  with pytest.raises(InputError, match="'dog' does not occur"):
    align.equalizer(TOK, "a photo of a cat", {"dog": 2.0})


def test_cross_replace_alpha_windows():
  alpha = cross_replace_alpha(TOK, "a dog on a mat", 10, 0.8)  # ⌊0.8·11⌋ = 8 steps.
  np.testing.assert_array_equal(alpha, np.repeat((np.arange(10) < 8)[:, None], L, axis=1))
  alpha = cross_replace_alpha(TOK, "a dog on a mat", 10, {"default_": 1.0, "dog": (0.2, 0.5)})
  np.testing.assert_array_equal(alpha[:, 2], (np.arange(10) >= 2) & (np.arange(10) < 5))
  assert alpha[:, [0, 1, 3, 10]].all()
  alpha = cross_replace_alpha(TOK, "a dog on a mat", 10, {"dog": 0.3, "zebra": 0.1})
  np.testing.assert_array_equal(alpha[:, 2], np.arange(10) < 3)
  assert alpha[:, 3].all()  # default (0, 1); absent words are ignored.
  with pytest.raises(ConfigError, match="cross_replace_steps"):
    cross_replace_alpha(TOK, "a dog", 10, (0.7, 0.2))


def test_self_replace_window():
  assert self_replace_window(10, 0.4) == (0, 4)
  assert self_replace_window(50, (0.2, 0.6)) == (10, 30)
  with pytest.raises(ConfigError, match="self_replace_steps"):
    self_replace_window(10, 1.5)
