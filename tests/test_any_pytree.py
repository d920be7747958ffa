"""Weights outside Flax linen: Equinox modules, PyTorch-layout state dicts, other leaf names.

References are written by hand here, independent of the library: docs/spec.md section 2 in JAX for the Equinox
MLP (so its gradients can be compared: ``eqx.filter_grad`` of the library's path against ``jax.grad``
of the hand-written one) and float64 NumPy (test_adapter_core's ``np_effective``) for state dicts.
Tolerances: float32 against float32 through the same few small matmuls, 1e-5 relative + 1e-6 absolute
(gradients 1e-4 relative: summation order differs); float32 against float64 as test_adapter_core.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_adapter_core import np_effective, randomize

import sora_jax as sj
from sora_jax.config import AdapterError

METHODS = ["lora", "dora", "prediag", "pre_ortho", "post_ortho", "sora"]


def _hand_effective(W_oi, b, lv, method, s):
    """docs/spec.md section 2 for a PyTorch/Equinox weight ``W_oi: (d_out, d_in)``, by hand: returns ``(W'_oi, b')``."""
    W = W_oi.T  # (d_in, d_out)
    AB = s * lv["A"] @ lv["B"]
    if "C" in lv:
        C, D = lv["C"], lv["D"]
        sp = jnp.minimum(1.0, 1.0 / (jnp.linalg.norm(C) + jnp.linalg.norm(D) + 1e-6))
        R = jnp.eye(W.shape[1]) + sp * (C @ D.T - D @ C.T)
    if method == "lora":
        Wn, bn = W + AB, b
    elif method == "dora":
        V = W + AB
        Wn, bn = V * (lv["m"] / jax.lax.stop_gradient(jnp.linalg.norm(V, axis=0))), b
    elif method == "prediag":
        Wn, bn = W * lv["d"] + AB, lv["d"] * b
    elif method == "pre_ortho":
        Wn, bn = W @ R + AB, b @ R
    elif method == "post_ortho":
        Wn, bn = (W + AB) @ R, b @ R
    else:  # sora
        Wn, bn = (W * lv["d"] + AB) @ R, (lv["d"] * b) @ R
    return Wn.T, bn


def _mlp():
    return eqx.nn.MLP(in_size=6, out_size=3, width_size=7, depth=2, activation=jax.nn.tanh, key=jax.random.key(0))


@pytest.mark.parametrize("method", METHODS)
def test_equinox_mlp_values_and_filter_grad_equal_hand_written(method):
    mlp = _mlp()
    assert mlp.layers[0].weight.shape == (7, 6)  # eqx.nn.Linear: weight (d_out, d_in)
    cfg = sj.AdapterConfig(method=method, r=2, lora_alpha=4, rotation_rank=1, target_modules=["layers.0", "layers.1", "layers.2"])
    adapter = randomize(sj.init_adapter(jax.random.key(1), mlp, cfg))
    assert adapter.layers["layers/0"]["A"].shape == (6, 2) and adapter.layers["layers/0"]["B"].shape == (2, 7)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)

    def loss(ad, model, x):
        adapted = sj.apply_adapter(model, ad)
        return jnp.sum(jnp.sin(jax.vmap(adapted)(x)))

    def hand_forward(ad, x):
        h = x
        for k, layer in enumerate(mlp.layers):
            W, b = _hand_effective(layer.weight, layer.bias, ad.layers[f"layers/{k}"], method, 2.0)
            h = h @ W.T + b
            if k < len(mlp.layers) - 1:
                h = jnp.tanh(h)
        return h

    adapted = sj.apply_adapter(mlp, adapter)
    assert isinstance(adapted, eqx.nn.MLP) and adapted.activation is mlp.activation
    np.testing.assert_allclose(np.asarray(jax.vmap(adapted)(x)), np.asarray(hand_forward(adapter, x)), rtol=1e-5, atol=1e-6)
    grads = eqx.filter_jit(eqx.filter_grad(loss))(adapter, mlp, x)
    want = jax.grad(lambda ad: jnp.sum(jnp.sin(hand_forward(ad, x))))(adapter)
    for path, lv in want.layers.items():
        for name, g in lv.items():
            assert np.abs(np.asarray(g)).max() > 0, (path, name)
            np.testing.assert_allclose(np.asarray(grads.layers[path][name]), np.asarray(g), rtol=1e-4, atol=1e-6,
                                       err_msg=f"{path}/{name}")
    # merge keeps the module type; counts see only arrays (the activation functions are not parameters)
    assert isinstance(sj.merge(mlp, adapter), eqx.nn.MLP)
    n = sum(v.size for v in jax.tree.leaves(eqx.filter(mlp, eqx.is_array)))
    assert sj.trainable_parameters(mlp, adapter)["total"] == n + sum(v.size for v in jax.tree.leaves(adapter))


def test_pytorch_state_dict_flat_dotted_keys():
    rng = np.random.default_rng(0)
    state = {
        "encoder.layer.0.attention.self.query.weight": rng.normal(size=(10, 12)).astype(np.float32),
        "encoder.layer.0.attention.self.query.bias": rng.normal(size=(10,)).astype(np.float32),
        "encoder.layer.0.output.dense.weight": rng.normal(size=(12, 10)).astype(np.float32),
        "encoder.layer.0.output.LayerNorm.weight": np.ones(12, np.float32),
    }
    cfg = sj.AdapterConfig(method="sora", r=3, lora_alpha=6, rotation_rank=2, target_modules=["query", "output.dense"])
    adapter = randomize(sj.init_adapter(jax.random.key(0), state, cfg))
    assert set(adapter.layers) == {"encoder/layer/0/attention/self/query", "encoder/layer/0/output/dense"}
    out = sj.apply_adapter(state, adapter)
    assert set(out) == set(state)
    for key in ("encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense"):
        W = state[key + ".weight"]
        b = state.get(key + ".bias")
        Wr, br = np_effective(W.T, b, adapter.layers[key.replace(".", "/")], "sora", 2.0)
        np.testing.assert_allclose(np.asarray(out[key + ".weight"]), Wr.T, rtol=1e-5, atol=1e-5)
        if b is not None:
            np.testing.assert_allclose(np.asarray(out[key + ".bias"]), br, rtol=1e-5, atol=1e-5)
    assert out["encoder.layer.0.output.LayerNorm.weight"] is state["encoder.layer.0.output.LayerNorm.weight"]


def test_named_weight_leaves_and_layout():
    # a Haiku-style tree: weight "w" (d_in, d_out), bias "b"
    rng = np.random.default_rng(0)
    params = {"mlp/~/linear_0": {"w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
                                 "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}
    with pytest.raises(AdapterError, match=r"no weight leaf found.*'kernel' \(d_in, d_out\), 'weight' \(d_out, d_in\).*weight_leaves"):
        sj.init_adapter(jax.random.key(0), params, sj.AdapterConfig(target_modules=".*"))
    cfg = sj.AdapterConfig(method="prediag", r=2, lora_alpha=2, target_modules=["linear_0"], weight_leaves={"w": "io"},
                           bias_leaf="b")
    adapter = randomize(sj.init_adapter(jax.random.key(0), params, cfg))
    out = sj.apply_adapter(params, adapter)
    mod = params["mlp/~/linear_0"]
    Wr, br = np_effective(mod["w"], mod["b"], adapter.layers["mlp/~/linear_0"], "prediag", 1.0)
    np.testing.assert_allclose(np.asarray(out["mlp/~/linear_0"]["w"]), Wr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["mlp/~/linear_0"]["b"]), br, rtol=1e-5, atol=1e-5)
    # the layout travels with the config (JSON round trip) and bad values are named
    assert sj.AdapterConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(AdapterError, match=r"weight_leaves\['w'\] = 'in'; use 'io'"):
        sj.AdapterConfig(weight_leaves={"w": "in"})
    with pytest.raises(AdapterError, match=r"kernel_axes\['q'\] = 'ix'"):
        sj.AdapterConfig(kernel_axes={"q": "ix"})


def test_torch_layout_weight_that_is_square_is_read_transposed():
    # a square (d_out, d_in) weight is where reading the wrong orientation would go unnoticed by shapes
    W = np.arange(16, dtype=np.float32).reshape(4, 4) / 10
    state = {"lin.weight": W}
    cfg = sj.AdapterConfig(method="dora", r=1, target_modules=["lin"])
    adapter = sj.init_adapter(jax.random.key(0), state, cfg)
    # DoRA's magnitude is the column norm of the (d_in, d_out) matrix: the norm of each *row* of W (out, in)
    np.testing.assert_allclose(np.asarray(adapter.layers["lin"]["m"]), np.linalg.norm(W, axis=1), rtol=1e-6)
