"""The activation path on a user's own linen and NNX model equals ``apply_adapter`` in values and gradients.

Both sides are the library's (``apply_adapter`` is itself checked against float64 NumPy in
test_adapter_core and test_layouts); here the two execution paths must agree, every method, both the
fused and the all-activation form of the layer. Tolerance: float32, different association of the same
sums through attention and an MLP with O(1) values: 2e-5 relative + 2e-5 absolute on outputs, 1e-4
relative + 1e-5 absolute on gradients (the gradients are sums over 2 x 6 tokens of products of such
outputs).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_adapter_core import randomize

import sora_jax as sj
from sora_jax.config import AdapterError
from sora_jax.intercept import linen_activation_path, nnx_activation_path

D, HEADS = 8, 2
TARGETS = ["query", "value", "out", "up", "down"]
METHODS = sj.METHODS


def _x():
    return jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, D)), jnp.float32)


class LinenBlock(nn.Module):
    """A user's model, written as linen's documentation writes one (no sora_jax hooks)."""

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(nn.LayerNorm()(x))
        h = nn.Dense(3 * D, name="up")(nn.LayerNorm()(x))
        return x + nn.Dense(D, name="down")(nn.gelu(h))


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=rngs)
        self.up, self.down = nnx.Linear(D, 3 * D, rngs=rngs), nnx.Linear(3 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


def _close(got, want, rtol, atol, what):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol, err_msg=f"{what} {path}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("method", METHODS)
def test_linen_activation_path_equals_weight_path(method, fused):
    model, x = LinenBlock(), _x()
    params = model.init(jax.random.key(0), x)["params"]
    cfg = sj.AdapterConfig(method=method, r=2, lora_alpha=4, rotation_rank=1, target_modules=TARGETS)
    adapter = randomize(sj.init_adapter(jax.random.key(1), params, cfg), seed=2)
    adapter = jax.tree.map(lambda v: 0.5 * v if v.ndim == 2 else v, adapter)  # keep O(1) activations

    def weight_loss(ad):
        return jnp.sum(jnp.sin(model.apply({"params": sj.apply_adapter(params, ad)}, x)))

    def act_loss(ad):
        with linen_activation_path(ad, fused=fused):
            return jnp.sum(jnp.sin(model.apply({"params": params}, x)))

    with linen_activation_path(adapter, fused=fused):
        got = model.apply({"params": params}, x)
    want = model.apply({"params": sj.apply_adapter(params, adapter)}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert not np.allclose(np.asarray(got), np.asarray(model.apply({"params": params}, x)), atol=1e-3)
    g_act = jax.jit(jax.grad(act_loss))(adapter)
    g_w = jax.jit(jax.grad(weight_loss))(adapter)
    _close(g_act, g_w, 1e-4, 1e-5, "grad")
    # the layers run through the activation path's layer (its hand-written backward), not the weight path
    jaxpr = str(jax.make_jaxpr(act_loss)(adapter))
    assert jaxpr.count("custom_vjp_call") == len(TARGETS)  # query, value, out, up, down


@pytest.mark.parametrize("method", METHODS)
def test_nnx_activation_path_equals_weight_path(method):
    model, x = NnxBlock(nnx.Rngs(0)), _x()
    graphdef, state = nnx.split(model)
    cfg = sj.AdapterConfig(method=method, r=2, lora_alpha=4, rotation_rank=1, target_modules=TARGETS)
    adapter = randomize(sj.init_adapter(jax.random.key(1), state, cfg), seed=2)
    adapter = jax.tree.map(lambda v: 0.5 * v if v.ndim == 2 else v, adapter)
    assert set(adapter.layers) == {"attn/query", "attn/value", "attn/out", "up", "down"}

    def weight_loss(ad, st):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, sj.apply_adapter(st, ad))(x)))

    def act_loss(ad, st):
        m = nnx.merge(graphdef, st)
        with nnx_activation_path(m, ad):
            return jnp.sum(jnp.sin(m(x)))

    with nnx_activation_path(model, adapter):
        got = model(x)
    want = nnx.merge(graphdef, sj.apply_adapter(state, adapter))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    # outside the context the model is the frozen one again
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(nnx.merge(graphdef, state)(x)), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(model(x)), atol=1e-3)
    _close(jax.jit(jax.grad(act_loss))(adapter, state), jax.jit(jax.grad(weight_loss))(adapter, state), 1e-4, 1e-5,
           "grad")


def test_errors_name_the_module_and_the_fix():
    # an adapter made for another model
    model, x = NnxBlock(nnx.Rngs(0)), _x()
    other = {"mlp": {"kernel": jnp.ones((D, D))}}
    adapter = sj.init_adapter(jax.random.key(0), other, sj.AdapterConfig(r=2, target_modules=["mlp"]))
    with pytest.raises(AdapterError, match=r"adapter modules \['mlp'\] are no nnx.Linear.*apply_adapter"), \
            nnx_activation_path(model, adapter):
        model(x)
    # stacked (scanned) layers: the activation path cannot see the scan index
    stack = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)()
    params = stack.init(jax.random.key(0), x, None)["params"]
    cfg = sj.AdapterConfig(r=2, target_modules=["up"])
    adapter = sj.init_adapter(jax.random.key(0), params, cfg)
    with pytest.raises(AdapterError, match=r"'block/up'.*A \(2, 8, 2\).*stacked layers.*apply_adapter"), \
            linen_activation_path(adapter):
        stack.apply({"params": params}, x, None)


class _ScanBody(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return LinenBlock(name="block")(x), None
