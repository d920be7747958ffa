"""Scaled dot-product attention with a hand-written backward pass that keeps one ``(B, H, T, S)`` tensor.

``O = drop(softmax(Q K^T * scale + bias)) V`` per head, ``Q: (B, T, H, D)``, ``K, V: (B, S, H, D)``,
``bias`` additive and broadcastable to ``(B, H, T, S)``, ``drop`` dropout on the probabilities (rate
``p``: ``P * M / (1 - p)``, ``M`` a Bernoulli keep mask); without dropout the same layout and values as
:func:`jax.nn.dot_product_attention` (logits and softmax in float32, probabilities cast to ``V``'s dtype).

Autodiff of that function (its XLA form) keeps, per call, three float32 ``(B, H, T, S)`` tensors and
transposed copies of ``Q``, ``K`` and ``V`` for the backward pass. This one keeps the probabilities
``P: (B, H, T, S)`` (and the boolean mask ``M`` with dropout) and ``Q, K, V`` as they are: the very arrays
the projections before it produced, so that a projection that keeps its own output for a gradient shares
them. The backward pass, with ``P~ = P * M / (1 - p)``:

    dV = P~^T dO,   dP = (dO V^T) * M / (1 - p),   dS = P * (dP - rowsum(dP * P)),
    dQ = scale dS K,   dK = scale dS^T Q

and it makes the transposed copies its matmuls need itself (:func:`sora_jax.models.recompute.after`).
On ``minilm`` at batch 32 x 128 that is about 50 MiB less per block for every training step
(experiments/PERF.md, change 13).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sora_jax.models.recompute import after

Array = jax.Array


def _dropped(probs: Array, keep: Array | None, rate: float) -> Array:
    """``P * M / (1 - p)`` (``P`` itself without a mask)."""
    return probs if keep is None else jnp.where(keep, probs / (1.0 - rate), 0).astype(probs.dtype)


def _forward(q: Array, k: Array, v: Array, bias: Array | None, keep: Array | None, scale: float, rate: float):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", _dropped(probs, keep, rate), v), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q: Array, k: Array, v: Array, bias: Array | None, keep: Array | None, scale: float,
               rate: float) -> Array:
    return _forward(q, k, v, bias, keep, scale, rate)[0]


def _attention_fwd(q, k, v, bias, keep, scale, rate):
    out, probs = _forward(q, k, v, bias, keep, scale, rate)
    return out, (q, k, v, bias, keep, probs)


def _attention_bwd(scale: float, rate: float, res, g: Array):
    q, k, v, bias, keep, probs = res
    q, k, v, probs = (after(t, g) for t in (q, k, v, probs))
    f32 = jnp.float32
    dv = jnp.einsum("bhqk,bqhd->bkhd", _dropped(probs, keep, rate), g.astype(probs.dtype)).astype(v.dtype)
    dp = _dropped(jnp.einsum("bqhd,bkhd->bhqk", g, v, preferred_element_type=f32), keep, rate)
    p32 = probs.astype(f32)
    ds = p32 * (dp - jnp.sum(dp * p32, axis=-1, keepdims=True))  # cotangent of the logits (scaled, biased)
    dq = (jnp.einsum("bhqk,bkhd->bqhd", ds, k.astype(f32)) * scale).astype(q.dtype)
    dk = (jnp.einsum("bhqk,bqhd->bkhd", ds, q.astype(f32)) * scale).astype(k.dtype)
    dbias = None
    if bias is not None:  # dead code unless the bias is differentiated
        axes = tuple(i for i, n in enumerate(bias.shape) if n == 1 and ds.shape[i] != 1)
        dbias = jnp.sum(ds, axis=axes, keepdims=True).astype(bias.dtype)
    return dq, dk, dv, dbias, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(
    q: Array, k: Array, v: Array, bias: Array | None = None, scale: float | None = None, *,
    dropout_rate: float = 0.0, dropout_rng: Array | None = None,
) -> Array:
    """``drop(softmax(Q K^T * scale + bias)) V`` per head (module docstring): ``q: (B, T, H, D)``,
    ``k, v: (B, S, H, D)``, ``bias`` 4-D, broadcastable to ``(B, H, T, S)``; ``scale`` defaults to
    ``D ** -0.5``. Dropout on the probabilities when ``dropout_rng`` is given and ``dropout_rate > 0``.
    Returns ``(B, T, H, D)``."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q (B, T, H, D) and k, v (B, S, H, D); got {q.shape}, {k.shape}, {v.shape}")
    if bias is not None and bias.ndim != 4:
        raise ValueError(f"bias must be 4-D, broadcastable to (B, H, T, S); got shape {bias.shape}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    keep = None
    if dropout_rng is not None and dropout_rate > 0.0:
        B, T, H, _ = q.shape
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, (B, H, T, k.shape[1]))
    return _attention(q, k, v, bias, keep, float(q.shape[-1] ** -0.5 if scale is None else scale),
                      float(dropout_rate))
