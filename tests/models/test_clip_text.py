"""CLIPTextEncoder: parity with transformers' PyTorch CLIPTextModel on random weights (torch side)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jip2p.checkpoints import load_torch_state_dict
from jip2p.errors import ConfigError, InputError
from jip2p.models import clip_text

BOS, EOS = 49406, 49407
# SD 1.5's text_encoder/config.json as written by transformers 4.22 (legacy eos_token_id 2).
SD15_JSON = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_hidden_layers": 3, "max_position_embeddings": 16, "vocab_size": 49408}


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def torch_clip(seed: int = 0, **config) -> transformers.CLIPTextModel:
  """A random CLIPTextModel whose layer-norm affines are random too."""
  torch.manual_seed(seed)
  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.LayerNorm):
        m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
        m.bias.copy_(0.2 * torch.randn_like(m.bias))
  return model


def jax_clip(tm: transformers.CLIPTextModel, dtype=jnp.float32) -> clip_text.CLIPTextEncoder:
  config = clip_text.CLIPTextConfig.from_dict(tm.config.to_dict())
  model = nnx.eval_shape(lambda: clip_text.CLIPTextEncoder(config, dtype=dtype, rngs=nnx.Rngs(0)))
  state = clip_text.canonical_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})
  load_torch_state_dict(model, state)
  return model


def token_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
  """Tokeniser-shaped ids: BOS, words, EOS, then EOS padding (as SD's tokenizer pads)."""
  rs = np.random.RandomState(seed)
  ids = np.full((batch, length), EOS, np.int64)
  ids[:, 0] = BOS
  for b in range(batch):
    n = rs.randint(1, length - 2)
    ids[b, 1:1 + n] = rs.randint(0, BOS, n)
  return ids


def reference(tm, ids, skip: int = 0):
  with torch.no_grad():
    out = tm(torch.from_numpy(ids), output_hidden_states=True)
    hidden = tm.final_layer_norm(out.hidden_states[-1 - skip]).numpy()
  return out, hidden


@nnx.jit
def _encode(model, ids):
  hidden = model(ids)
  return hidden, model.pooled(ids, hidden)


def test_tiny_quick_gelu_parity():
  tm = torch_clip(hidden_act="quick_gelu", **TINY)
  model = jax_clip(tm)
  ids = token_ids(2, 16)
  out, _ = reference(tm, ids)
  hidden = model(jnp.asarray(ids, jnp.int32))
  assert hidden.shape == (2, 16, 64) and hidden.dtype == jnp.float32
  assert rel_err(hidden, out.last_hidden_state.numpy()) <= 1e-4
  # New-style eos_token_id (49407): the first EOS position, not the last padding one.
  assert rel_err(model.pooled(jnp.asarray(ids), hidden), out.pooler_output.numpy()) <= 1e-4


def test_tiny_gelu_sd2_style_penultimate_layer():
  tm = torch_clip(hidden_act="gelu", eos_token_id=2, **TINY)
  model = jax_clip(tm)
  ids = token_ids(2, 12, seed=1)
  out, penultimate = reference(tm, ids, skip=1)
  got = model(jnp.asarray(ids, jnp.int32), skip_last_layers=1)
  assert rel_err(got, penultimate) <= 1e-4
  assert rel_err(model(jnp.asarray(ids, jnp.int32)), out.last_hidden_state.numpy()) <= 1e-4
  assert rel_err(got, out.last_hidden_state.numpy()) > 1e-2  # a different layer, really
  # Legacy eos_token_id 2: the position of the largest id.
  hidden = jnp.asarray(out.last_hidden_state.numpy())
  assert rel_err(model.pooled(jnp.asarray(ids), hidden), out.pooler_output.numpy()) <= 1e-4


def test_sd15_shapes_parity():
  """CLIP ViT-L/14 text (123M parameters), batch 2 × 77 tokens; about 15 s on 2 CPU cores."""
  config = clip_text.CLIPTextConfig.from_dict(SD15_JSON)
  tm = torch_clip(**{k: v for k, v in SD15_JSON.items()
                     if not k.startswith("_") and k not in ("architectures", "model_type")})
  model = jax_clip(tm)
  assert model.config == config
  ids = token_ids(2, 77, seed=2)
  out, _ = reference(tm, ids)
  hidden, pooled = _encode(model, jnp.asarray(ids, jnp.int32))
  assert hidden.shape == (2, 77, 768)
  assert rel_err(hidden, out.last_hidden_state.numpy()) <= 1e-4
  assert rel_err(pooled, out.pooler_output.numpy()) <= 1e-4


def test_bfloat16_close_to_float32():
  tm = torch_clip(**TINY)
  ids = jnp.asarray(token_ids(2, 16), jnp.int32)
  f32 = jax_clip(tm)(ids)
  bf16 = jax_clip(tm, dtype=jnp.bfloat16)(ids)
  assert bf16.dtype == jnp.float32
  assert rel_err(bf16, f32) < 3e-2


def test_config_from_dict():
  assert clip_text.CLIPTextConfig.from_dict(SD15_JSON).hidden_size == 768
  # What transformers 5 writes, generic PretrainedConfig keys included.
  full = transformers.CLIPTextConfig(**TINY).to_dict()
  config = clip_text.CLIPTextConfig.from_dict(full)
  assert config.eos_token_id == EOS and config.num_hidden_layers == 3
  assert clip_text.CLIPTextConfig.from_dict(config.to_dict()) == config
  assert clip_text.CLIPTextConfig(**TINY) == config  # same defaults as transformers
  with pytest.raises(ConfigError, match="hidden_layers"):
    clip_text.CLIPTextConfig.from_dict({**SD15_JSON, "hidden_layers": 12})
  with pytest.raises(ConfigError, match="hidden_act='relu'"):
    clip_text.CLIPTextConfig.from_dict({**SD15_JSON, "hidden_act": "relu"})
  with pytest.raises(ConfigError, match="model_type='clip'"):
    clip_text.CLIPTextConfig.from_dict({**SD15_JSON, "model_type": "clip"})


def test_bad_arguments_raise():
  model = nnx.eval_shape(lambda: clip_text.CLIPTextEncoder(
      clip_text.CLIPTextConfig.from_dict(TINY), rngs=nnx.Rngs(0)))
  ids = jnp.zeros((1, 16), jnp.int32)
  with pytest.raises(ConfigError, match="skip_last_layers=3"):
    model(ids, skip_last_layers=3)
  with pytest.raises(InputError, match=r"\(1, 17\)"):
    model(jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ConfigError, match="attention_impl"):
    clip_text.CLIPTextEncoder(clip_text.CLIPTextConfig.from_dict(TINY), attention_impl="flash",
                              rngs=nnx.Rngs(0))


def test_canonical_state_dict_adds_prefix_once():
  state = {"embeddings.token_embedding.weight": 1, "text_model.final_layer_norm.weight": 2}
  assert clip_text.canonical_state_dict(state) == {
      "text_model.embeddings.token_embedding.weight": 1, "text_model.final_layer_norm.weight": 2}
