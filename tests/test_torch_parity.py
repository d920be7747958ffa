"""Parity with PyTorch: PEFT's LoRA and DoRA on an ``nn.Linear``, and a PyTorch SORA written from docs/spec.md.

Both sides compute in float32 with different summation orders; outputs are O(1-10) and we allow
2e-5 relative + 2e-5 absolute on outputs and 1e-4 on gradients (sums over the batch of 16 rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from torch_reference import ConditionedLinear

import sora_jax as sj

D_IN, D_OUT, R, ALPHA, N = 12, 10, 4, 8, 16
TOL = {"rtol": 2e-5, "atol": 2e-5}
GTOL = {"rtol": 1e-4, "atol": 1e-4}


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(D_IN, D_OUT)

    def forward(self, x):
        return self.lin(x)


def t2n(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def jax_loss_and_grads(params, adapter, x, G):
    def loss(ad):
        p = sj.apply_adapter(params, ad)
        y = x @ p["lin"]["kernel"] + p["lin"]["bias"]
        return jnp.sum(y * G), y

    (_, y), g = jax.value_and_grad(loss, has_aux=True)(adapter)
    return np.asarray(y), {k: np.asarray(v) for k, v in g.layers["lin"].items()}


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_lora_dora_outputs_and_gradients(use_dora):
    torch.manual_seed(0)
    net = Net()
    model = peft.get_peft_model(
        net, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], lora_dropout=0.0, use_dora=use_dora)
    )
    lin = model.base_model.model.lin
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()  # non-zero, trained-looking
        if use_dora:
            lin.lora_magnitude_vector["default"].weight.mul_(1 + 0.2 * torch.randn(D_OUT))
    x = torch.randn(N, D_IN)
    G = torch.randn(N, D_OUT)
    y_t = model(x)
    (y_t * G).sum().backward()

    W = t2n(lin.base_layer.weight)
    params = {"lin": {"kernel": jnp.asarray(W.T), "bias": jnp.asarray(t2n(lin.base_layer.bias))}}
    cfg = sj.AdapterConfig(method="dora" if use_dora else "lora", r=R, lora_alpha=ALPHA, target_modules=["lin"])
    layers = {"A": jnp.asarray(t2n(lin.lora_A["default"].weight).T), "B": jnp.asarray(t2n(lin.lora_B["default"].weight).T)}
    if use_dora:
        layers["m"] = jnp.asarray(t2n(lin.lora_magnitude_vector["default"].weight))
    adapter = sj.Adapter(cfg, {"lin": layers})
    y_j, g = jax_loss_and_grads(params, adapter, jnp.asarray(t2n(x)), jnp.asarray(t2n(G)))

    np.testing.assert_allclose(y_j, t2n(y_t), **TOL)
    np.testing.assert_allclose(g["A"], t2n(lin.lora_A["default"].weight.grad).T, **GTOL)
    np.testing.assert_allclose(g["B"], t2n(lin.lora_B["default"].weight.grad).T, **GTOL)
    if use_dora:
        np.testing.assert_allclose(g["m"], t2n(lin.lora_magnitude_vector["default"].weight.grad), **GTOL)
        # our initial m is PEFT's initial magnitude: colnorm(W)
        init = sj.init_adapter(jax.random.key(0), params, cfg)
        base = Net()
        with torch.no_grad():
            base.lin.weight.copy_(torch.from_numpy(W))
        fresh = peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], use_dora=True))
        fresh_lin = fresh.base_model.model.lin
        np.testing.assert_allclose(
            np.asarray(init.layers["lin"]["m"]), t2n(fresh_lin.lora_magnitude_vector["default"].weight), rtol=1e-6
        )


@pytest.mark.parametrize("big_factors", [False, True])
def test_sora_against_pytorch_reference(big_factors):
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    W, b = rn(D_OUT, D_IN), rn(D_OUT)
    A, B, d = 0.3 * rn(R, D_IN), 0.3 * rn(D_OUT, R), 1 + 0.2 * rn(D_OUT)
    # big factors: ||C|| + ||D|| > 1, so s_p < 1 and the gradient flows through the norms
    scale = 1.0 if big_factors else 0.05
    C, D = scale * rn(D_OUT, 2), scale * rn(D_OUT, 2)
    ref = ConditionedLinear(lambda x: torch.nn.functional.linear(x, W, b), A, B, d, C, D, scaling=ALPHA / R)
    x, G = rn(N, D_IN), rn(N, D_OUT)
    y_t = ref(x)
    (y_t * G).sum().backward()
    sp = float(1.0 / (C.norm() + D.norm() + 1e-6))
    assert (sp < 1) == big_factors

    params = {"lin": {"kernel": jnp.asarray(t2n(W).T), "bias": jnp.asarray(t2n(b))}}
    cfg = sj.AdapterConfig(method="sora", r=R, lora_alpha=ALPHA, rotation_rank=2, target_modules=["lin"])
    adapter = sj.Adapter(cfg, {"lin": {
        "A": jnp.asarray(t2n(A).T), "B": jnp.asarray(t2n(B).T), "d": jnp.asarray(t2n(d)),
        "C": jnp.asarray(t2n(C)), "D": jnp.asarray(t2n(D)),
    }})
    y_j, grads = jax_loss_and_grads(params, adapter, jnp.asarray(t2n(x)), jnp.asarray(t2n(G)))
    np.testing.assert_allclose(y_j, t2n(y_t), **TOL)
    np.testing.assert_allclose(grads["A"], t2n(ref.A.grad).T, **GTOL)
    np.testing.assert_allclose(grads["B"], t2n(ref.B.grad).T, **GTOL)
    for name in ("d", "C", "D"):
        np.testing.assert_allclose(grads[name], t2n(getattr(ref, name).grad), **GTOL, err_msg=name)
    # the activation path gives the same outputs and gradients
    dense = lambda ad: sj.adapted_dense(ad)(("lin",), jnp.asarray(t2n(x)), params["lin"]["kernel"], params["lin"]["bias"])  # noqa: E731
    (_, y_a), g_a = jax.value_and_grad(lambda ad: (jnp.sum(dense(ad) * jnp.asarray(t2n(G))), dense(ad)), has_aux=True)(adapter)
    np.testing.assert_allclose(np.asarray(y_a), t2n(y_t), **TOL)
    for name in ("A", "B", "d", "C", "D"):
        np.testing.assert_allclose(np.asarray(g_a.layers["lin"][name]), grads[name], **GTOL, err_msg=name)


def test_peft_dora_with_dropout_same_mask():
    """DoRA with LoRA dropout is PEFT's ``W x + b + (g - 1) W drop(x) + g s B A drop(x)`` (``g = m / n``), on
    the activation path, with the same dropout mask on both sides (PEFT's dropout module replaced by the mask
    drawn from the layer's key). Outputs, adapter gradients and the input gradient; tolerances as above."""
    p = 0.5
    torch.manual_seed(0)
    model = peft.get_peft_model(
        Net(), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], lora_dropout=p, use_dora=True)
    )
    model.train()
    lin = model.base_model.model.lin
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()
        lin.lora_magnitude_vector["default"].weight.mul_(1 + 0.2 * torch.randn(D_OUT))
    x_np = np.random.default_rng(0).normal(size=(N, D_IN)).astype(np.float32)
    G_np = np.random.default_rng(1).normal(size=(N, D_OUT)).astype(np.float32)
    key = jax.random.key(7)
    # the mask adapted_dense draws for module "lin": bernoulli(fold_in(key, crc32(path)), 1 - p, x.shape)
    import zlib

    keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, zlib.crc32(b"lin")), 1 - p, x_np.shape))
    assert 0 < keep.mean() < 1

    class SameMask(torch.nn.Module):
        def forward(self, x):
            return x * torch.from_numpy(keep.astype(np.float32) / (1 - p))

    lin.lora_dropout["default"] = SameMask()
    x = torch.from_numpy(x_np).requires_grad_(True)
    y_t = model(x)
    (y_t * torch.from_numpy(G_np)).sum().backward()

    params = {"lin": {"kernel": jnp.asarray(t2n(lin.base_layer.weight).T), "bias": jnp.asarray(t2n(lin.base_layer.bias))}}
    cfg = sj.AdapterConfig(method="dora", r=R, lora_alpha=ALPHA, lora_dropout=p, target_modules=["lin"])
    adapter = sj.Adapter(cfg, {"lin": {
        "A": jnp.asarray(t2n(lin.lora_A["default"].weight).T), "B": jnp.asarray(t2n(lin.lora_B["default"].weight).T),
        "m": jnp.asarray(t2n(lin.lora_magnitude_vector["default"].weight)),
    }})

    def loss(ad, xj):
        y = sj.adapted_dense(ad, dropout_rng=key)(("lin",), xj, params["lin"]["kernel"], params["lin"]["bias"])
        return jnp.sum(y * jnp.asarray(G_np)), y

    (_, y_j), (g, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(adapter, jnp.asarray(x_np))
    np.testing.assert_allclose(np.asarray(y_j), t2n(y_t), **TOL)
    np.testing.assert_allclose(np.asarray(g.layers["lin"]["A"]), t2n(lin.lora_A["default"].weight.grad).T, **GTOL)
    np.testing.assert_allclose(np.asarray(g.layers["lin"]["B"]), t2n(lin.lora_B["default"].weight.grad).T, **GTOL)
    np.testing.assert_allclose(
        np.asarray(g.layers["lin"]["m"]), t2n(lin.lora_magnitude_vector["default"].weight.grad), **GTOL
    )
    np.testing.assert_allclose(np.asarray(gx), t2n(x.grad), **GTOL)


@pytest.mark.parametrize("method", ["sora", "post_ortho"])
@pytest.mark.parametrize("fused", [None, False])
def test_bf16_activations_keep_a_small_rotation(method, fused):
    """bfloat16 activations and kernel with a float32 adapter whose rotation is small (``||C - D|| / ||C|| =
    1e-3``, a diagonal 1 + O(1e-2)): the adapter's arithmetic must stay float32. Reference: float64 NumPy on the
    same (bfloat16-valued) inputs. The layer returns bfloat16, whose rounding (~2e-3 of the output) is larger
    than the rotation term itself (~1e-3), so the error is measured along the term: ``<out - out64, t64> /
    <t64, t64>`` over 4096 x 384 outputs, where rounding noise averages to ~2e-3 / (1e-3 sqrt(1.5e6)) = 0.2 %;
    the bar is 1 %. With the leaves cast to bfloat16 (the rotation computed in bfloat16) it was 22-34 %."""
    rng = np.random.default_rng(0)
    n, d = 4096, 384
    bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
    W, b, x = bf(rng.normal(size=(d, d)) / np.sqrt(d)), bf(rng.normal(size=d)), bf(rng.normal(size=(n, d)))
    r, s = 4, 1.0
    A, B = 0.05 * rng.normal(size=(d, r)), 0.05 * rng.normal(size=(r, d))
    C = rng.normal(size=(d, 1))
    D = C + 1e-3 * np.linalg.norm(C) * rng.normal(size=(d, 1)) / np.sqrt(d)
    dd = 1 + 0.01 * rng.normal(size=d)
    cfg = sj.AdapterConfig(method=method, r=r, lora_alpha=r * s, rotation_rank=1, target_modules=["lin"])
    leaves = {"A": A, "B": B, "C": C, "D": D} | ({"d": dd} if method == "sora" else {})
    adapter = sj.Adapter(cfg, {"lin": {k: jnp.asarray(v, jnp.float32) for k, v in leaves.items()}})
    # float64 reference from the float32 leaves' values
    A, B, C, D = (np.asarray(adapter.layers["lin"][k], np.float64) for k in "ABCD")
    z = x @ W + b
    if method == "sora":
        z = np.asarray(adapter.layers["lin"]["d"], np.float64) * z
    z = z + s * (x @ A) @ B
    sp = min(1.0, 1.0 / (np.linalg.norm(C) + np.linalg.norm(D) + 1e-6))
    t = sp * ((z @ C) @ D.T - (z @ D) @ C.T)
    assert 5e-4 < np.linalg.norm(t) / np.linalg.norm(z) < 2e-3  # a rotation below bfloat16's resolution
    out = sj.adapted_dense(adapter, fused=fused)(
        ("lin",), jnp.asarray(x, jnp.bfloat16), jnp.asarray(W, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    )
    assert out.dtype == jnp.bfloat16
    err = np.asarray(out, np.float64) - (z + t)
    rel = abs(np.sum(err * t)) / np.sum(t * t)
    assert rel < 0.01, rel
