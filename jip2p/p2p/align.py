"""Token alignment between a caption and its edit, on the host, from the CLIP tokenizer.

Prompt-to-Prompt (Hertz et al. 2022) moves image 0's cross-attention maps onto image 1's tokens,
so it needs to know which token of the edited caption corresponds to which token of the source.
Two alignments, with the semantics of google/prompt-to-prompt's ``seq_aligner``:

  * `replacement_mapper` (word swap, "Replace"): the captions have the same number of
    space-separated words; each swapped word's tokens map onto the new word's tokens (one to one
    when the token counts agree, otherwise every source token spreads evenly over the target
    tokens), every other token onto its counterpart. An ``[L, L]`` matrix, source rows → target
    columns.
  * `refinement_mapper` ("Refine", words added or removed): Needleman–Wunsch global alignment of
    the two token sequences (bos and eos included; gap 0, match 1, mismatch −1); each target token
    takes its aligned source token, or none (alpha 0) when it was inserted.

Token positions count the bos token as 0, as in the text encoder's 77-token input. A word is a
piece of the caption split on single spaces, as in the reference.

One deliberate difference from the reference: after the last swapped word the reference maps
target token j to source token j, which is off by the difference in token counts whenever a
swapped word changes length in tokens (``mapper[j, j]`` for ``mapper[i, j]``); here every later
source token maps onto its counterpart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from jip2p.errors import InputError
from jip2p.tokenizer import CLIPTokenizer

GAP, MATCH, MISMATCH = 0, 1, -1
# Traceback moves, tried in this order on ties (the reference's order: it decides which of
# several equally good alignments is taken).
_LEFT, _UP, _DIAGONAL = 1, 2, 3


def _words(text: str) -> list[str]:
  return text.split(" ")


def word_token_spans(tokenizer: CLIPTokenizer, text: str) -> list[np.ndarray]:
  """Token positions of each space-separated word of ``text`` (bos at 0), truncated as the text
  encoder's input is (positions up to ``max_length − 2``)."""
  spans, start = [], 1
  for word in _words(text):
    n = len(tokenizer.encode(word))
    positions = np.arange(start, start + n)
    spans.append(positions[positions < tokenizer.max_length - 1])
    start += n
  return spans


def word_token_indices(tokenizer: CLIPTokenizer, text: str, word: str | int) -> np.ndarray:
  """Token positions of a word of ``text``: every occurrence of a word given as a string, or the
  word at a 0-based word index. Empty when the word does not occur."""
  spans = word_token_spans(tokenizer, text)
  if isinstance(word, str):
    chosen = [s for w, s in zip(_words(text), spans) if w == word]
  else:
    if not 0 <= word < len(spans):
      raise InputError(f"word index {word} is out of range for {text!r} ({len(spans)} words)")
    chosen = [spans[word]]
  return np.concatenate(chosen) if chosen else np.zeros((0,), np.int64)


def replacement_mapper(tokenizer: CLIPTokenizer, source: str, target: str) -> np.ndarray:
  """The word-swap map, float32 ``[L, L]``: image 1's map of token n = Σ_w image 0's map of token
  w · M[w, n]. Raises `InputError` unless both captions have the same number of words."""
  words_x, words_y = _words(source), _words(target)
  if len(words_x) != len(words_y):
    raise InputError(f"a word swap needs captions with the same number of words: {source!r} has "
                     f"{len(words_x)}, {target!r} has {len(words_y)}")
  length = tokenizer.max_length
  spans_x = word_token_spans(tokenizer, source)
  spans_y = word_token_spans(tokenizer, target)
  swapped = [k for k in range(len(words_x)) if words_x[k] != words_y[k]]
  mapper = np.zeros((length, length), np.float32)
  i = j = 0
  queue = [(spans_x[k], spans_y[k]) for k in swapped if len(spans_x[k]) and len(spans_y[k])]
  while i < length and j < length:
    if queue and queue[0][0][0] == i:
      src, tgt = queue.pop(0)
      if len(src) == len(tgt):
        mapper[src, tgt] = 1.0
      else:
        mapper[np.ix_(src, tgt)] = 1.0 / len(tgt)
      i += len(src)
      j += len(tgt)
    else:
      mapper[i, j] = 1.0
      i += 1
      j += 1
  return mapper


def _token_sequence(tokenizer: CLIPTokenizer, text: str) -> list[int]:
  ids = tokenizer.encode(text)[:tokenizer.max_length - 2]
  return [tokenizer.bos_id, *ids, tokenizer.eos_id]


def global_alignment(x: Sequence[int], y: Sequence[int]) -> list[int]:
  """Needleman–Wunsch: for each element of ``y``, the index of its aligned element of ``x``, or
  −1 where ``y`` has an insertion. Scores: gap 0, match 1, mismatch −1."""
  n, m = len(x), len(y)
  score = np.zeros((n + 1, m + 1), np.int64)
  move = np.zeros((n + 1, m + 1), np.int8)
  score[0, 1:] = np.arange(1, m + 1) * GAP
  score[1:, 0] = np.arange(1, n + 1) * GAP
  move[0, 1:], move[1:, 0] = _LEFT, _UP
  for a in range(1, n + 1):
    for b in range(1, m + 1):
      left = score[a, b - 1] + GAP
      up = score[a - 1, b] + GAP
      diagonal = score[a - 1, b - 1] + (MATCH if x[a - 1] == y[b - 1] else MISMATCH)
      best = max(left, up, diagonal)
      score[a, b] = best
      move[a, b] = _LEFT if best == left else _UP if best == up else _DIAGONAL
  aligned = []
  a, b = n, m
  while a > 0 or b > 0:
    step = move[a, b]
    if step == _DIAGONAL:
      a, b = a - 1, b - 1
      aligned.append(a)
    elif step == _LEFT:
      b -= 1
      aligned.append(-1)
    else:
      a -= 1
  return aligned[::-1]


def refinement_mapper(tokenizer: CLIPTokenizer, source: str, target: str
                      ) -> tuple[np.ndarray, np.ndarray]:
  """The refinement alignment: (mapper int32 ``[L]``, alphas float32 ``[L]``).

  ``mapper[n]`` is the source position whose map target token n takes, ``alphas[n]`` 0 where
  target token n has no source (the reference's −1 entries; they map to 0 here) and 1 elsewhere.
  Positions after the target's eos map to themselves.
  """
  length = tokenizer.max_length
  x, y = _token_sequence(tokenizer, source), _token_sequence(tokenizer, target)
  aligned = np.asarray(global_alignment(x, y), np.int64)
  mapper = np.arange(length, dtype=np.int64)
  alphas = np.ones(length, np.float32)
  mapper[:len(y)] = np.maximum(aligned, 0)
  alphas[:len(y)] = aligned >= 0
  return mapper.astype(np.int32), alphas


def refinement_map(tokenizer: CLIPTokenizer, source: str, target: str
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The refinement alignment as a token map (M ``[L, L]``, keep ``[L]``): image 1's map of
  token n = Σ_w image 0's map of w · M[w, n] + image 1's own map of n · keep[n]."""
  mapper, alphas = refinement_mapper(tokenizer, source, target)
  length = tokenizer.max_length
  matrix = np.zeros((length, length), np.float32)
  matrix[mapper, np.arange(length)] = alphas
  return matrix, 1.0 - alphas


def equalizer(tokenizer: CLIPTokenizer, text: str, weights: Mapping[str | int, float]
              ) -> np.ndarray:
  """Prompt-to-Prompt's Reweight: per-token scale, float32 ``[L]``, 1 except on the tokens of the
  given words of ``text`` (words as strings or 0-based word indices)."""
  scale = np.ones(tokenizer.max_length, np.float32)
  for word, value in weights.items():
    positions = word_token_indices(tokenizer, text, word)
    if not len(positions):
      raise InputError(f"reweighted word {word!r} does not occur in {text!r}")
    scale[positions] = value
  return scale
