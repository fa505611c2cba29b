"""Per-prompt Prompt-to-Prompt options (config defaults, a prompts line's "p2p" object) and the
candidate axis sharded over the 8 fake CPU devices, on the tiny pipeline of conftest.py."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jip2p.errors import ConfigError
from jip2p.p2p import dataset, generation_config, sampling

C0, C1 = "a photo of a cat", "a photo of a dog"
OVERRIDE = {"cross_replace_steps": [0.0, 0.3], "reweight": {"dog": 3.0}}


def _line(**extra) -> str:
  return json.dumps({"input": C0, "edit": "make it a dog", "output": C1, **extra})


def test_options_from_config_and_json():
  base = sampling.p2p_options(generation_config.base_config().p2p.to_dict())
  assert base == sampling.P2POptions(edit="auto", cross_replace_steps=(0.0, 0.8),
                                     self_replace_steps=(0.0, 0.4))
  options = sampling.p2p_options({**OVERRIDE, "blend_words": [["cat"], "dog"]}, base)
  assert options.cross_replace_steps == (0.0, 0.3) and options.reweight == {"dog": 3.0}
  assert options.blend_words == (("cat",), ("dog",)) and options.edit == "auto"
  per_word = sampling.p2p_options({"cross_replace_steps": {"dog": 0.5, "default_": [0.1, 1]}})
  assert per_word.cross_replace_steps == {"dog": (0.0, 0.5), "default_": (0.1, 1.0)}
  for bad, match in (({"edits": "replace"}, "unknown p2p option 'edits'"),
                     ({"edit": "swap"}, "edit 'swap'"),
                     ({"cross_replace_steps": 1.5}, "cross_replace_steps=1.5"),
                     ({"self_replace_steps": [0.5, 0.2]}, "self_replace_steps"),
                     ({"reweight": {"dog": "big"}}, "reweight"),
                     ({"blend_words": ["cat"]}, "blend_words"),
                     ({"blend_threshold": True}, "blend_threshold"),
                     ([1, 2], "must be an object")):
    with pytest.raises(ConfigError, match=match):
      sampling.p2p_options(bad)


def test_bad_p2p_objects_are_skipped_with_line_numbers(pipeline):
  lines = [_line(), _line(p2p={"edit": "swap"}), _line(p2p=OVERRIDE), _line(p2p="replace"),
           json.dumps({"input": C0, "edit": "e", "output": "a cat"}),  # replace needs 5 words
           _line(p2p={"reweight": {"horse": 2.0}}), _line(p2p={"edit": "refine", "colour": 1})]
  defaults = sampling.P2POptions(edit="replace")
  prompts, report = dataset.read_prompts(lines, pipeline.tokenizer, p2p=defaults)
  assert [p.index for p in prompts] == [0, 2]
  assert prompts[0].p2p == defaults
  assert prompts[1].p2p == sampling.p2p_options(OVERRIDE, defaults)
  assert report.skipped["bad p2p object"] == [2, 4, 7]
  assert report.skipped["p2p options do not fit the captions"] == [5, 6]
  summary = report.summary()
  assert "bad p2p object: lines 2, 4, 7; line 2: unknown Prompt-to-Prompt edit 'swap'" in summary
  assert "same number of words" in summary
  # "auto" refines captions of different word counts instead of skipping them.
  prompts, _ = dataset.read_prompts(lines[4:5], pipeline.tokenizer,
                                p2p=sampling.P2POptions(edit="auto"))
  assert len(prompts) == 1
  prompts, report = dataset.read_prompts(lines[:3], pipeline.tokenizer)  # ip2p mode
  assert [p.index for p in prompts] == [0] and prompts[0].p2p is None
  assert report.skipped["p2p options outside p2p mode"] == [2, 3]


class _Scorer:
  """Keeps what the generation loop submits instead of scoring it."""

  def __init__(self):
    self.submitted = {}

  def submit(self, batch_index, images0, images1, captions0, captions1):
    self.submitted[batch_index] = np.stack([images0, images1], axis=1)


def _run_images(generator, tokenizer, line, config_p2p):
  config = generation_config.GenerationConfig(candidates=2, batch_size=2, mode="p2p",
                                              p2p=config_p2p)
  [prompt], _ = dataset.read_prompts([line], tokenizer, p2p=config_p2p)
  scorer = _Scorer()
  loop = dataset._Run(generator, scorer, None, None, config, dataset.RunReport(), None)
  loop._generate(0, [(prompt, 0), (prompt, 1)])
  return scorer.submitted[0]


def test_prompt_override_equals_the_same_options_in_the_config(generator, pipeline):
  defaults = sampling.P2POptions(edit="auto")
  overridden = _run_images(generator, pipeline.tokenizer, _line(p2p=OVERRIDE), defaults)
  configured = _run_images(generator, pipeline.tokenizer, _line(),
                           sampling.p2p_options(OVERRIDE, defaults))
  plain = _run_images(generator, pipeline.tokenizer, _line(), defaults)
  assert overridden.shape == (2, 2, 32, 32, 3)
  np.testing.assert_array_equal(overridden, configured)
  np.testing.assert_array_equal(overridden[:, 0], plain[:, 0])  # image 0 is never edited
  assert np.abs(overridden[:, 1].astype(int) - plain[:, 1]).max() > 10


def test_candidates_are_sharded_and_match_one_device(pipeline):
  assert jax.local_device_count() == 8
  sharded = sampling.PairGenerator(pipeline, steps=2, height=32, width=32)
  single = sampling.PairGenerator(pipeline, steps=2, height=32, width=32,
                                  devices=jax.local_devices()[:1])
  assert sharded._program(6)[0].devices.size == 2  # gcd(6, 8): no padding
  options = [sampling.P2POptions(blend_words=(["cat"], ["dog"])), sampling.P2POptions()] * 4
  kwargs = dict(mode="p2p", p2p=options, return_attention=True, to_host=False)
  many = sharded([(C0, C1)] * 8, range(8), **kwargs)
  one = single([(C0, C1)] * 8, range(8), **kwargs)
  for array in (many.images, many.attention):
    assert array.sharding.spec == PartitionSpec(sampling.CANDIDATES)
    assert array.sharding.mesh.devices.size == 8
    assert {s.data.shape[0] for s in array.addressable_shards} == {1}
  assert len(one.images.sharding.device_set) == 1
  np.testing.assert_allclose(np.asarray(many.attention), np.asarray(one.attention), atol=1e-5)
  difference = np.abs(np.asarray(many.images, int) - np.asarray(one.images, int))
  assert difference.max() <= 1 and (difference == 0).mean() > 0.99
  assert np.asarray(many.images).std() > 5
