"""An open_clip text tower → jip2p's CLIPTextEncoder (`convert.convert_open_clip_text`): the
hidden states equal open_clip's own per-token text states after ln_final, on random weights."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from jip2p.checkpoints import convert
from jip2p.checkpoints.folders import load_component
from jip2p.errors import CheckpointError
from jip2p.tokenizer import load_tokenizer

PROMPTS = ["a red circle in the top left, on a white background", "", "a photo of a cat!"]


def tiny_config(layers=2, quick_gelu=False):
  return {"embed_dim": 24, "quick_gelu": quick_gelu,
          "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                         "head_width": 16},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4,
                       "layers": layers}}


def write_model(tmp_path, config, seed=0, suffix=".safetensors"):
  torch.manual_seed(seed)
  model = open_clip.CLIP(**config).eval()
  with torch.no_grad():  # open_clip initialises LayerNorms to identity: make them matter
    for name, p in model.named_parameters():
      if "ln" in name:
        p.add_(0.3 * torch.randn_like(p))
  config_path, weights = tmp_path / "tiny.json", tmp_path / f"tiny{suffix}"
  config_path.write_text(json.dumps(config))
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(state, str(weights)) if suffix == ".safetensors" else torch.save(state, weights)
  return model, str(weights), str(config_path)


@torch.no_grad()
def open_clip_token_states(model, tokens):
  """open_clip's encode_text up to ln_final: [B, 77, D], every position."""
  x = model.token_embedding(tokens) + model.positional_embedding
  x = model.transformer(x, attn_mask=model.attn_mask)
  return model.ln_final(x).numpy()


# 24 layers: a plain open_clip file keeps resblocks.23, which diffusers drops for SD 2.x files.
@pytest.mark.parametrize("layers,quick_gelu,suffix", [(2, False, ".safetensors"),
                                                      (24, False, ".pt"), (2, True, ".safetensors")])
def test_hidden_states_equal_open_clip(tmp_path, layers, quick_gelu, suffix):
  model, weights, config = write_model(tmp_path, tiny_config(layers, quick_gelu), suffix=suffix)
  encoder, tokenizer = convert.convert_open_clip_text(weights, config)
  assert encoder.config.num_hidden_layers == layers
  assert encoder.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
  tokens = open_clip.tokenize(PROMPTS)
  ids = tokenizer(PROMPTS)  # the converted tokenizer gives open_clip's ids, padding 0 included
  np.testing.assert_array_equal(np.asarray(ids), tokens.numpy())
  want = open_clip_token_states(model, tokens)
  got = np.asarray(encoder(jnp.asarray(ids, jnp.int32)))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
  # pooled at the end token, then projected: open_clip's text features
  pooled = np.asarray(encoder.pooled(jnp.asarray(ids), jnp.asarray(got)))
  with torch.no_grad():
    features = model.encode_text(tokens).numpy()
  np.testing.assert_allclose(pooled @ model.text_projection.detach().numpy(), features, atol=2e-5)


def test_written_folder_loads_back(tmp_path):
  _, weights, config = write_model(tmp_path, tiny_config())
  encoder, tokenizer = convert.convert_open_clip_text(weights, config)
  out = tmp_path / "out"
  convert.save_text_encoder(encoder, tokenizer, str(out))
  assert sorted(p.name for p in out.iterdir()) == ["text_encoder", "tokenizer"]
  loaded = load_component(str(out / "text_encoder"))
  assert loaded.config == encoder.config
  ids = jnp.asarray(load_tokenizer(str(out))(PROMPTS), jnp.int32)
  assert int(ids[1, -1]) == 0  # pads with "!" (id 0), as open_clip
  np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(encoder(ids)))
  with pytest.raises(CheckpointError, match="exists"):
    convert.save_text_encoder(encoder, tokenizer, str(out))
  convert.save_text_encoder(encoder, tokenizer, str(out), overwrite=True)


def test_unconvertible_text_tower_is_named(tmp_path):
  _, weights, config = write_model(tmp_path, tiny_config())
  cfg = json.loads(open(config).read())
  cfg["text_cfg"]["ls_init_value"] = 0.1
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="ls_init_value"):
    convert.convert_open_clip_text(weights, str(bad))
  with pytest.raises(CheckpointError, match="does not exist"):
    convert.convert_open_clip_text(str(tmp_path / "none.safetensors"), config)


def test_jip2p_convert_writes_a_text_encoder_folder(tmp_path, capsys):
  from jip2p.checkpoints import load_text_encoder
  from jip2p.cli import convert as convert_cli
  _, weights, config = write_model(tmp_path, tiny_config())
  out = tmp_path / "text"
  assert convert_cli.main(["--open-clip-config", config, weights, str(out)]) == 0
  encoder, tokenizer = load_text_encoder(str(out))
  want, _ = convert.convert_open_clip_text(weights, config)
  ids = jnp.asarray(tokenizer(PROMPTS), jnp.int32)
  np.testing.assert_array_equal(np.asarray(encoder(ids)), np.asarray(want(ids)))
  capsys.readouterr()
  # a second run refuses, --overwrite replaces; flags of the pipeline form are refused
  assert convert_cli.main(["--open-clip-config", config, weights, str(out)]) == 2
  assert convert_cli.main(["--open-clip-config", config, weights, str(out), "--overwrite",
                           "--dtype", "float16"]) == 0
  assert convert_cli.main(["--open-clip-config", config, weights, str(tmp_path / "x"),
                           "--expand-conv-in", "8"]) == 2
  assert convert_cli.main(["--open-clip-config", config, str(tmp_path / "none.safetensors"),
                           str(tmp_path / "y")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 3 and all(line.startswith("jip2p-convert: error: ") for line in err), err
  assert "exists" in err[0] and "--expand-conv-in" in err[1] and "does not exist" in err[2]
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_an_open_clip_config_is_converted_once_into_the_cache(tmp_path, monkeypatch):
  from jip2p.checkpoints import load_text_encoder, open_clip_text_folder
  monkeypatch.setenv("JIP2P_MODEL_CACHE", str(tmp_path / "cache"))
  _, weights, config = write_model(tmp_path, tiny_config())
  folder = open_clip_text_folder(config)
  assert [p.name for p in (tmp_path / "cache").iterdir()] == [pathlib.Path(folder).name]
  stamp = (pathlib.Path(folder) / "text_encoder" / "config.json").stat().st_mtime_ns
  assert open_clip_text_folder(config) == folder  # no second conversion
  assert (pathlib.Path(folder) / "text_encoder" / "config.json").stat().st_mtime_ns == stamp
  encoder, _ = load_text_encoder(folder)
  want, tokenizer = convert.convert_open_clip_text(weights, config)
  ids = jnp.asarray(tokenizer(PROMPTS), jnp.int32)
  np.testing.assert_array_equal(np.asarray(encoder(ids)), np.asarray(want(ids)))
  pathlib.Path(weights).unlink()
  with pytest.raises(CheckpointError, match="with its weights beside it"):
    open_clip_text_folder(config)
  bad = tmp_path / "bad.json"
  bad.write_text("{}")
  (tmp_path / "bad.safetensors").write_bytes(pathlib.Path(folder, "text_encoder",
                                                          "model.safetensors").read_bytes())
  with pytest.raises(CheckpointError, match="no text_cfg"):
    open_clip_text_folder(str(bad))
