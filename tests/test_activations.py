"""Activations with written-out derivatives (``sora_jax.activations``) against float64 NumPy.

Values: the float64 definitions (``scipy.special.erf``); derivatives: float64 central differences of
those definitions (step 1e-5, error ~1e-10; second differences with step 1e-4, error ~1e-7). The library
computes in float32: 2e-6 absolute + 1e-5 relative is a few float32 ulps for values and slopes of size
<= 8 on [-8, 8]; the second derivative (autodiff of the written-out first) gets 10x that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from sora_jax.activations import ACTIVATIONS, activation, gated


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


NUMPY = {
    "gelu": lambda x: 0.5 * x * (1.0 + scipy.special.erf(x / np.sqrt(2.0))),
    "gelu_new": lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x * _sigmoid(x),
    "quick_gelu": lambda x: x * _sigmoid(1.702 * x),
}
X64 = np.concatenate([np.linspace(-8.0, 8.0, 801), [0.0, 1e-3, -1e-3]])


@pytest.mark.parametrize("name", sorted(NUMPY))
def test_value_and_derivative_match_float64(name):
    f = activation(name)
    x = jnp.asarray(X64, jnp.float32)
    ref, h = NUMPY[name], 1e-5
    np.testing.assert_allclose(np.asarray(f(x)), ref(X64), rtol=1e-5, atol=2e-6)
    slope = (ref(X64 + h) - ref(X64 - h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(f))(x)), slope, rtol=1e-5, atol=2e-6)
    # forward mode and the second derivative work through the written-out derivative
    _, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(np.asarray(tangent), slope, rtol=1e-5, atol=2e-6)
    second = jax.vmap(jax.grad(jax.grad(f)))(x)
    h2 = 1e-4
    want = (ref(X64 + h2) - 2 * ref(X64) + ref(X64 - h2)) / h2**2
    np.testing.assert_allclose(np.asarray(second), want, rtol=1e-4, atol=2e-5)


def test_aliases_and_unknown_name():
    assert ACTIVATIONS["gelu_python"] is ACTIVATIONS["gelu"]
    assert ACTIVATIONS["gelu_pytorch_tanh"] is ACTIVATIONS["gelu_new"]
    assert ACTIVATIONS["swish"] is ACTIVATIONS["silu"]
    with pytest.raises(ValueError, match="Unsupported activation 'mish'; supported: .*gelu"):
        activation("mish")


def test_bfloat16_gradient_keeps_dtype():
    x = jnp.linspace(-4, 4, 9, dtype=jnp.bfloat16)
    g = jax.grad(lambda x: jnp.sum(activation("gelu")(x)))(x)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(jax.vmap(jax.grad(activation("gelu")))(
        x.astype(jnp.float32))), atol=2e-2)


@pytest.mark.parametrize("name", ["silu", "gelu_new"])
def test_gated_product_and_gradients_match_float64(name):
    """``gated(name)(x, g) = act(g) * x`` and its gradients ``(dy act(g), dy x act'(g))`` against the float64
    definitions (``act'`` by central differences as above); tolerances as for the activations."""
    rng = np.random.default_rng(0)
    g64, x64, dy64 = (rng.uniform(-6, 6, size=(7, 33)) for _ in range(3))
    f = gated(name)
    g, x, dy = (jnp.asarray(v, jnp.float32) for v in (g64, x64, dy64))
    ref, h = NUMPY[name], 1e-5
    y, vjp = jax.vjp(f, x, g)
    np.testing.assert_allclose(np.asarray(y), ref(g64) * x64, rtol=1e-5, atol=2e-6 * 6)
    dx, dg = vjp(dy)
    slope = (ref(g64 + h) - ref(g64 - h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(dg), dy64 * x64 * slope, rtol=1e-5, atol=2e-6 * 36)
    np.testing.assert_allclose(np.asarray(dx), dy64 * ref(g64), rtol=1e-5, atol=2e-6 * 6)


def test_gated_backward_keeps_only_its_two_inputs():
    """The point of :func:`gated`: reverse mode keeps ``gate`` and ``x`` where autodiff of ``act(g) * x``
    keeps ``act(g)``, ``act'(g)`` and ``x``. XLA's compiled memory analysis of a gradient through ``L``
    gated MLP blocks (deterministic, not a timing) must show at least ``L - 1`` fewer ``(N, f)`` arrays."""
    n, d, f, layers = 256, 16, 128, 4
    keys = jax.random.split(jax.random.key(0), 3 * layers + 1)
    x0 = jax.random.normal(keys[0], (n, d))
    ws = [0.1 * jax.random.normal(k, (d, f) if i % 3 < 2 else (f, d)) for i, k in enumerate(keys[1:])]

    def temp_bytes(product) -> int:
        def loss(x):
            for i in range(layers):
                wg, wu, wd = ws[3 * i : 3 * i + 3]
                x = x + product(x @ wg, x @ wu) @ wd
            return jnp.sum(x * x)

        return jax.jit(jax.grad(loss)).lower(x0).compile().memory_analysis().temp_size_in_bytes

    plain = temp_bytes(lambda g, u: activation("silu")(g) * u)
    lean = temp_bytes(lambda g, u: gated("silu")(u, g))
    assert plain - lean >= (layers - 1) * n * f * 4, (plain, lean)
