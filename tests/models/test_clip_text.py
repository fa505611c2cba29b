"""CLIPTextEncoder(WithProjection) and SDXL's prompt encoding: parity with transformers' PyTorch
CLIPTextModel(WithProjection) and diffusers' SDXL ``encode_prompt`` on random weights (torch side).
"""

import gc

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jip2p.checkpoints import load_component, load_torch_state_dict, save_component
from jip2p.errors import ConfigError, InputError
from jip2p.models import clip_text
from jip2p.models.layers import abstract_module
from jip2p.tokenizer import CLIPTokenizer

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


# SDXL base 1.0's text_encoder/ (CLIP ViT-L/14) and text_encoder_2/ (OpenCLIP ViT-bigG/14).
SDXL_TEXT = {k: v for k, v in SD15_JSON.items() if not k.startswith("_")
             and k not in ("architectures", "model_type", "torch_dtype", "transformers_version")}
SDXL_TEXT_2 = {**SDXL_TEXT, "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
               "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280}
# Their tiny stand-ins: different widths and depths, as the real pair has.
TINY_TEXT = {**SDXL_TEXT, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
             "num_hidden_layers": 3, "projection_dim": 32}
TINY_TEXT_2 = {**SDXL_TEXT_2, "hidden_size": 48, "intermediate_size": 64,
               "num_attention_heads": 4, "num_hidden_layers": 4, "projection_dim": 24}


def torch_clip(seed: int = 0, cls=transformers.CLIPTextModel, **config):
  """A random CLIPTextModel (or ``cls``) whose layer-norm affines are random too."""
  torch.manual_seed(seed)
  model = cls(transformers.CLIPTextConfig(**config)).eval()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.LayerNorm):
        m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
        m.bias.copy_(0.2 * torch.randn_like(m.bias))
  return model


def jax_clip(tm, dtype=jnp.float32):
  """The jip2p twin of a transformers CLIPTextModel(WithProjection) ``tm``."""
  config = clip_text.CLIPTextConfig.from_dict(tm.config.to_dict())
  cls = (clip_text.CLIPTextEncoderWithProjection
         if isinstance(tm, transformers.CLIPTextModelWithProjection) else clip_text.CLIPTextEncoder)
  model = abstract_module(lambda rngs: cls(config, dtype=dtype, rngs=rngs))
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
  model = abstract_module(lambda rngs: clip_text.CLIPTextEncoder(
      clip_text.CLIPTextConfig.from_dict(TINY), rngs=rngs))
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


def test_tiny_with_projection_parity():
  """CLIPTextModelWithProjection: text_embeds, the raw penultimate layer and the last state."""
  tm = torch_clip(seed=3, cls=transformers.CLIPTextModelWithProjection, **TINY_TEXT_2)
  model = jax_clip(tm)
  ids = token_ids(2, 16, seed=3)
  with torch.no_grad():
    out = tm(torch.from_numpy(ids), output_hidden_states=True)
  jids = jnp.asarray(ids, jnp.int32)
  penultimate, text_embeds = model.hidden_and_text_embeds(jids)
  assert text_embeds.shape == (2, 24) and text_embeds.dtype == jnp.float32
  assert rel_err(text_embeds, out.text_embeds.numpy()) <= 1e-4
  assert rel_err(penultimate, out.hidden_states[-2].numpy()) <= 1e-4
  last = model(jids)
  assert rel_err(last, out.last_hidden_state.numpy()) <= 1e-4
  assert rel_err(model.text_embeds(jids, last), out.text_embeds.numpy()) <= 1e-4
  raw = model(jids, skip_last_layers=2, final_layer_norm=False)
  assert rel_err(raw, out.hidden_states[-3].numpy()) <= 1e-4
  assert rel_err(raw, out.hidden_states[-2].numpy()) > 1e-2
  # The projection really is applied (24 wide, not the 48-wide pooled state).
  assert model.text_embeds(jids, last).shape[-1] != model.pooled(jids, last).shape[-1]


def test_with_projection_folder_round_trip(tmp_path):
  """transformers-saved text_encoder_2 → load_component → save_component → transformers."""
  tm = torch_clip(seed=4, cls=transformers.CLIPTextModelWithProjection, **TINY_TEXT_2)
  tm.save_pretrained(tmp_path / "text_encoder_2")
  model = load_component(str(tmp_path / "text_encoder_2"))
  assert type(model) is clip_text.CLIPTextEncoderWithProjection
  assert model.config.projection_dim == 24
  ids = token_ids(2, 16, seed=4)
  _, text_embeds = model.hidden_and_text_embeds(jnp.asarray(ids, jnp.int32))
  with torch.no_grad():
    want = tm(torch.from_numpy(ids)).text_embeds.numpy()
  assert rel_err(text_embeds, want) <= 1e-4
  save_component(model, str(tmp_path / "export"))
  # diffusers loads each component with the class model_index.json names; the config says which.
  again = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "export")
  assert again.config.architectures == ["CLIPTextModelWithProjection"]
  with torch.no_grad():
    np.testing.assert_allclose(again(torch.from_numpy(ids)).text_embeds.numpy(), want,
                               rtol=1e-6, atol=1e-6)
  # A plain CLIPTextModel still exports as one (the subclass is not mistaken for it, nor the
  # reverse), and its keys keep their text_model. prefix.
  plain = torch_clip(**TINY_TEXT)
  save_component(jax_clip(plain), str(tmp_path / "plain"))
  config = transformers.CLIPTextConfig.from_pretrained(tmp_path / "plain")
  assert config.architectures == ["CLIPTextModel"]
  assert type(load_component(str(tmp_path / "plain"))) is clip_text.CLIPTextEncoder


def _tokenizer_folders(tmp_path):
  """SDXL's two tokenizer folders: the same CLIP vocabulary, ``tokenizer/`` padded with
  <|endoftext|> (ViT-L's), ``tokenizer_2/`` with "!" = id 0 (OpenCLIP bigG's)."""
  default = CLIPTokenizer.default()
  default.write_folder(tmp_path / "tokenizer")
  CLIPTokenizer(default.vocab, default.merges, pad_token="!").write_folder(tmp_path / "tokenizer_2")
  return (CLIPTokenizer.from_folder(tmp_path / "tokenizer"),
          CLIPTokenizer.from_folder(tmp_path / "tokenizer_2"))


def _diffusers_sdxl(text_encoder, text_encoder_2, folder, cls):
  """A diffusers SDXL pipeline around the given text encoders (UNet / VAE unused here)."""
  return cls(vae=None, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
             tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"),
             tokenizer_2=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
             unet=None, scheduler=None)


PROMPTS = ["turn the sky into a sunset", "make it snow, in the style of a watercolor painting, "
           "with soft blue shadows and a small red house near the frozen lake at dawn " * 2]


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_sdxl_prompt_encoding_matches_diffusers(tmp_path, clip_skip):
  """Tokenizers from the folders, both encoders, penultimate states and the projected pooled
  text, against diffusers' SDXL ``encode_prompt`` (the second prompt is truncated at 77)."""
  tm1 = torch_clip(seed=5, **TINY_TEXT)
  tm2 = torch_clip(seed=6, cls=transformers.CLIPTextModelWithProjection, **TINY_TEXT_2)
  tok1, tok2 = _tokenizer_folders(tmp_path)
  ids1, ids2 = tok1(PROMPTS), tok2(PROMPTS)
  assert ids2.shape == (2, 77) and ids2[0, -1] == 0 and ids1[0, -1] == 49407
  cls = (diffusers.StableDiffusionXLInstructPix2PixPipeline if clip_skip == 0
         else diffusers.StableDiffusionXLPipeline)
  pipe = _diffusers_sdxl(tm1, tm2, tmp_path, cls)
  kwargs = {"clip_skip": clip_skip} if clip_skip else {}
  with torch.no_grad():
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False, **kwargs)
  got, got_pooled = clip_text.encode_prompt_sdxl(jax_clip(tm1), jax_clip(tm2),
                                                 jnp.asarray(ids1), jnp.asarray(ids2),
                                                 clip_skip=clip_skip)
  assert got.shape == (2, 77, 32 + 48) and got_pooled.shape == (2, 24)
  assert rel_err(got, embeds.numpy()) <= 1e-4
  assert rel_err(got_pooled, pooled.numpy()) <= 1e-4
  # Padding the second prompt with <|endoftext|> (the first tokenizer's way) is not the same.
  wrong, _ = clip_text.encode_prompt_sdxl(jax_clip(tm1), jax_clip(tm2), jnp.asarray(ids1),
                                          jnp.asarray(ids1), clip_skip=clip_skip)
  assert rel_err(wrong[0, :, 32:], embeds.numpy()[0, :, 32:]) > 1e-2


def test_sdxl_prompt_encoding_errors():
  make = lambda cls, cfg: abstract_module(
      lambda rngs: cls(clip_text.CLIPTextConfig.from_dict(cfg), rngs=rngs))
  enc1 = make(clip_text.CLIPTextEncoder, TINY_TEXT)
  enc2 = make(clip_text.CLIPTextEncoderWithProjection, TINY_TEXT_2)
  ids = jnp.zeros((1, 77), jnp.int32)
  with pytest.raises(ConfigError, match="must be a CLIPTextModelWithProjection"):
    clip_text.encode_prompt_sdxl(enc1, enc1, ids, ids)
  with pytest.raises(InputError, match=r"differ in shape: \(1, 77\) and \(2, 77\)"):
    clip_text.encode_prompt_sdxl(enc1, enc2, ids, jnp.zeros((2, 77), jnp.int32))
  with pytest.raises(ConfigError, match="skip_last_layers=3"):
    clip_text.encode_prompt_sdxl(enc1, enc2, ids, ids, clip_skip=2)



def test_sdxl_shapes_prompt_parity(tmp_path):
  """Real SDXL text encoders (ViT-L 123 M + bigG 695 M parameters), batch 2 × 77 tokens through
  both tokenizers, against diffusers' ``encode_prompt``; each JAX encoder is filled from the torch
  weights after the reference ran (peak about two copies of the 3.3 GB of float32 weights)."""
  tok1, tok2 = _tokenizer_folders(tmp_path)
  tm1 = torch_clip(seed=7, **SDXL_TEXT)
  tm2 = torch_clip(seed=8, cls=transformers.CLIPTextModelWithProjection, **SDXL_TEXT_2)
  pipe = _diffusers_sdxl(tm1, tm2, tmp_path, diffusers.StableDiffusionXLInstructPix2PixPipeline)
  with torch.no_grad():
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
  encoders = [jax_clip(tm1), jax_clip(tm2)]
  del tm1, tm2, pipe
  gc.collect()
  encode = nnx.jit(clip_text.encode_prompt_sdxl)
  got, got_pooled = encode(*encoders, jnp.asarray(tok1(PROMPTS)), jnp.asarray(tok2(PROMPTS)))
  assert got.shape == (2, 77, 2048) and got_pooled.shape == (2, 1280)
  assert rel_err(got, embeds.numpy()) <= 1e-4
  assert rel_err(got_pooled, pooled.numpy()) <= 1e-4

