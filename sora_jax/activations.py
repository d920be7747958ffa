"""Hugging Face activation names (``config.hidden_act``) -> JAX functions.

The smooth ones carry their derivative written out as one elementwise formula (a :func:`jax.custom_jvp`):

- ``gelu`` (exact): ``f = x Phi(x)``, ``f' = Phi(x) + x phi(x)``;
- ``gelu_new`` and the other tanh forms: ``f = x (1 + t) / 2`` with ``t = tanh(c (x + k x^3))``,
  ``c = sqrt(2 / pi)``, ``k = 0.044715``; ``f' = (1 + t) / 2 + x (1 - t^2) c (1 + 3 k x^2) / 2``;
- ``silu`` / ``swish``: ``f = x sigma(x)``, ``f' = sigma(x) (1 + x (1 - sigma(x)))``;
- ``quick_gelu``: ``f = x sigma(a x)``, ``a = 1.702``, ``f' = sigma(a x) (1 + a x (1 - sigma(a x)))``.

Values are ``jax.nn``'s. Autodiff of the composed definitions keeps several intermediates of each chain
for the backward pass (for an FFN, a few ``(tokens, d_ff)`` tensors); the written-out derivative keeps
one. On ``minilm`` at batch 32 x 128 that is 240 MiB less for the frozen model's training step
(1481 -> 1241 MiB) and for every adapter, and the step is a few per cent faster (experiments/PERF.md).
Forward-mode and higher derivatives work as before (the derivative is itself differentiable).

:func:`gated` is a gated MLP's product ``act(gate) * x`` (SwiGLU, GeGLU) with a backward that keeps only
``gate`` and ``x`` and recomputes ``act(gate)`` and its derivative: autodiff keeps ``act(gate)``,
``act'(gate)`` and ``x``, three ``(tokens, d_ff)`` tensors per layer instead of two (experiments/PERF.md,
change 20). Being a :func:`jax.custom_vjp`, it is differentiable in reverse mode only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sora_jax.recompute import recomputed

Array = jax.Array

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)


def _with_derivative(f: Callable[[Array], Array], df: Callable[[Array], Array]) -> Callable[[Array], Array]:
    """``f`` whose JVP is ``df(x) * t`` (``df`` elementwise, the same dtype as ``x``)."""
    g = jax.custom_jvp(f)

    @g.defjvp
    def _jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return f(x), df(x) * t

    return g


def _gelu_derivative(x: Array) -> Array:
    return 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF)) + x * jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _gelu_tanh_derivative(x: Array) -> Array:
    # (1 + t) / 2 = sigma(2 u) and 1 - t^2 = 4 sigma(2 u) (1 - sigma(2 u)): no cancellation where t ~ -1
    s = jax.nn.sigmoid(2.0 * _TANH_C * (x + 0.044715 * x * x * x))
    return s + 2.0 * x * s * (1.0 - s) * _TANH_C * (1.0 + 3 * 0.044715 * x * x)


def _sigmoid_scaled_derivative(x: Array, a: float) -> Array:
    s = jax.nn.sigmoid(a * x)
    return s * (1.0 + a * x * (1.0 - s))


gelu = _with_derivative(functools.partial(jax.nn.gelu, approximate=False), _gelu_derivative)
gelu_tanh = _with_derivative(functools.partial(jax.nn.gelu, approximate=True), _gelu_tanh_derivative)
silu = _with_derivative(jax.nn.silu, functools.partial(_sigmoid_scaled_derivative, a=1.0))
quick_gelu = _with_derivative(lambda x: x * jax.nn.sigmoid(1.702 * x),
                              functools.partial(_sigmoid_scaled_derivative, a=1.702))

# ``"gelu"`` is the exact, erf-based GELU, as in Hugging Face's ``ACT2FN``
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu,
    "gelu_python": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_python_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": silu,
    "swish": silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The JAX function for a Hugging Face activation name (``config.hidden_act``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"Unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}. "
            "Set the config's activation to one of these."
        ) from None


@dataclasses.dataclass(frozen=True)
class GatedProduct:
    """A gated MLP's product ``act(gate) * x`` for the activation named ``act``: a hashable function of
    ``(x, gate)`` (``(..., d)`` each)."""

    act: str

    def __call__(self, x: Array, gate: Array) -> Array:
        return activation(self.act)(gate) * x


def gated(name: str) -> Callable[[Array, Array], Array]:
    """``f(x, gate) = act(gate) * x`` for the activation ``name`` (:class:`GatedProduct`), whose backward keeps
    ``x`` and ``gate`` and recomputes the activation (:func:`sora_jax.recompute.recomputed`). Reverse-mode
    differentiable only."""
    return recomputed(GatedProduct(name))
