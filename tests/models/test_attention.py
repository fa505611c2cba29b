"""The attention implementations agree: "pallas" (Pallas TPU flash kernel, run in interpret mode on
CPU) against "xla", forward and backward, at the shapes the models use (77 text keys, 40-wide heads,
causal text attention), per device under a mesh, and inside the UNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jip2p import checkpoints
from jip2p.errors import ConfigError
from jip2p.models import attention
from jip2p.models.attention import dot_product_attention


def _qkv(seed, b, lq, lk, h, d):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, lq, h, d)), jax.random.normal(kk, (b, lk, h, d)),
          jax.random.normal(kv, (b, lk, h, d)))


@pytest.mark.parametrize("lq,lk,d,causal", [
    (64, 64, 40, False),    # self-attention, padded sequence and head dim
    (64, 77, 40, False),    # cross-attention to 77 text tokens (masked key padding)
    (77, 77, 16, True),     # CLIP's causal text attention
    (128, 256, 128, False),  # no padding, several key blocks
])
def test_pallas_forward_equals_xla(lq, lk, d, causal):
  q, k, v = _qkv(0, 2, lq, lk, 2, d)
  want = dot_product_attention(q, k, v, causal=causal, impl="xla")
  with attention.pallas_interpret():
    got = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, causal=causal, impl="pallas"))(
        q, k, v)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_pallas_gradients_equal_xla():
  q, k, v = _qkv(1, 1, 64, 77, 1, 40)
  w = jax.random.normal(jax.random.key(2), q.shape)

  def loss(impl):
    return lambda q, k, v: jnp.sum(w * dot_product_attention(q, k, v, impl=impl))

  want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  with attention.pallas_interpret():
    got = jax.jit(jax.grad(loss("pallas"), argnums=(0, 1, 2)))(q, k, v)
  for g, e in zip(got, want):
    np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-4)


def test_pallas_runs_per_device_under_a_mesh():
  devices = np.array(jax.devices()[:4]).reshape(2, 2)
  mesh = jax.sharding.Mesh(devices, ("data", "fsdp"))
  q, k, v = _qkv(3, 4, 64, 77, 2, 40)
  want = dot_product_attention(q, k, v, impl="xla")
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  q, k, v = jax.device_put((q, k, v), spec)
  with attention.pallas_interpret(), jax.set_mesh(mesh):
    got = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, impl="pallas"))(q, k, v)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_unet_with_pallas_attention_equals_xla():
  config = checkpoints.preset_configs("tiny", unet_in_channels=8)["unet"]
  config.update(block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D"], layers_per_block=1, norm_num_groups=8)
  xla = checkpoints.build_component(config, attention_impl="xla", seed=0)
  pallas = checkpoints.build_component(config, attention_impl="pallas", seed=0)
  x = jax.random.normal(jax.random.key(4), (1, 8, 8, 8))
  text = jax.random.normal(jax.random.key(5), (1, 77, 32))
  t = jnp.array([500])
  run = lambda model: nnx.jit(lambda m, x: m(x, t, text))(model, x)
  want = run(xla)
  with attention.pallas_interpret():
    got = run(pallas)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_pallas_off_tpu_is_a_clear_error():
  q, k, v = _qkv(6, 1, 8, 8, 1, 8)
  with pytest.raises(ConfigError, match="TPU kernel.*backend is 'cpu'"):
    dot_product_attention(q, k, v, impl="pallas")


def test_unknown_implementation_is_named():
  q, k, v = _qkv(7, 1, 8, 8, 1, 8)
  with pytest.raises(ConfigError, match="'flash'"):
    dot_product_attention(q, k, v, impl="flash")
