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

from sora_jax.activations import ACTIVATIONS, activation


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
