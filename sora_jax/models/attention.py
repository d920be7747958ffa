"""Scaled dot-product attention with a hand-written backward pass that keeps one ``(B, H, T, S)`` tensor.

``O = drop(softmax(cap(Q K^T * scale) + bias)) V`` per head, ``Q: (B, T, H, D)``, ``K, V: (B, S, K, D)`` with
``K`` dividing ``H`` (grouped-query attention: query head ``h`` reads key/value head ``h // (H / K)``),
``bias`` additive and broadcastable to ``(B, H, T, S)`` (a boolean ``mask`` becomes ``0`` / the float32
minimum), ``cap(x) = c tanh(x / c)`` Gemma 2's logit soft-capping (the identity without a cap ``c``),
``drop`` dropout on the probabilities (rate ``p``: ``P * M / (1 - p)``, ``M`` a Bernoulli keep mask); without
dropout and cap the same layout and values as :func:`jax.nn.dot_product_attention` (logits and softmax in
float32, probabilities cast to ``V``'s dtype).

Autodiff of that function (its XLA form) keeps, per call, three float32 ``(B, H, T, S)`` tensors and
transposed copies of ``Q``, ``K`` and ``V`` for the backward pass. This one keeps the probabilities
``P: (B, H, T, S)`` (and the boolean mask ``M`` with dropout) and ``Q, K, V`` as they are: the very arrays
the projections before it produced, so that a projection that keeps its own output for a gradient shares
them. The backward pass, with ``P~ = P * M / (1 - p)``:

    dV = P~^T dO,   dP = (dO V^T) * M / (1 - p),   dS = P * (dP - rowsum(dP * P)) * cap'(Q K^T * scale),
    dQ = scale dS K,   dK = scale dS^T Q,   cap'(x) = 1 - tanh(x / c)^2

and it makes the transposed copies its matmuls need itself (:func:`sora_jax.recompute.after`). With a cap it
recomputes ``Q K^T`` for ``cap'`` rather than keep a second ``(B, H, T, S)`` tensor.
On ``minilm`` at batch 32 x 128 that is about 50 MiB less per block for every training step
(experiments/PERF.md, change 13). :func:`rotary_attention` (the decoders') takes the projections' flat
outputs before the rotary embedding (and Gemma 3's per-head QK-norm) and rotates ``Q`` and ``K`` again in its
backward, so that it keeps the projections' arrays themselves, not normalised, rotated, head-shaped copies
(change 24).

Backends. That form is tuned for XLA's CPU backend. On a GPU, without dropout, the call goes to
:func:`jax.nn.dot_product_attention` instead, whose ``implementation=None`` picks cuDNN's fused attention
where it applies (and XLA's form elsewhere); ``$SORA_JAX_ATTENTION`` (``auto``, ``custom``, ``fused``)
overrides the choice (:func:`implementation`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sora_jax import dropout as _dropout
from sora_jax.recompute import after

Array = jax.Array


def _dropped(probs: Array, keep: Array | None, rate: float) -> Array:
    """``P * M / (1 - p)`` (``P`` itself without a mask)."""
    return probs if keep is None else jnp.where(keep, probs / (1.0 - rate), 0).astype(probs.dtype)


def rotate_half(x: Array) -> Array:
    """``[x1, x2] -> [-x2, x1]`` on the last axis (halves, not interleaved pairs, as Hugging Face)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rotate(x: Array, cos: Array, sin: Array) -> Array:
    """Rotary position embedding, ``x cos + rotate_half(x) sin``, ``cos, sin`` broadcastable to ``x``."""
    return x * cos + rotate_half(x) * sin


# Heads grouped: q and dq are (B, T, K, G, D), P and the bias (B, K, G, T, S), k, v (B, S, K, D).
def _heads(
    layout: tuple[int, int, int], norm: Callable | None, q: Array, k: Array, v: Array, cos: Array | None,
    sin: Array | None, q_scale: Array | None, k_scale: Array | None,
):
    """The caller's ``q, k, v`` in the grouped layout; ``q`` and ``k`` normalised per head by ``norm(x,
    scale)`` (``None``: not) and rotated by ``cos, sin: (B, T, D)`` (``None``: not)."""
    K, G, D = layout
    q = q.reshape(*q.shape[:2], K, G, D)
    k, v = k.reshape(*k.shape[:2], K, D), v.reshape(*v.shape[:2], K, D)
    if norm is not None:
        q, k = norm(q, q_scale), norm(k, k_scale)
    if cos is not None:
        q = rotate(q, cos[:, :, None, None], sin[:, :, None, None])
        k = rotate(k, cos[:, :, None], sin[:, :, None])
    return q, k, v


def _logits(q: Array, k: Array, scale: float) -> Array:
    """``Q K^T * scale`` in float32, before the cap: ``(B, K, G, T, S)``."""
    return jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale


def _forward(
    q: Array, k: Array, v: Array, bias: Array | None, keep: Array | None, scale: float, rate: float, cap: float | None
):
    logits = _logits(q, k, scale)
    if cap is not None:
        logits = cap * jnp.tanh(logits / cap)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", _dropped(probs, keep, rate), v), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12, 13))
def _attention(
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    keep: Array | None,
    cos: Array | None,
    sin: Array | None,
    q_scale: Array | None,
    k_scale: Array | None,
    scale: float,
    rate: float,
    layout: tuple[int, int, int],
    norm: Callable | None,
    cap: float | None,
) -> Array:
    """The attention of ``q, k, v`` in any shape that :func:`_heads` regroups (``layout = (K, G, D)``):
    ``(B, T, K * G * D)``."""
    out = _forward(*_heads(layout, norm, q, k, v, cos, sin, q_scale, k_scale), bias, keep, scale, rate, cap)[0]
    return out.reshape(*out.shape[:2], -1)


def _attention_fwd(q, k, v, bias, keep, cos, sin, q_scale, k_scale, scale, rate, layout, norm, cap):
    out, probs = _forward(*_heads(layout, norm, q, k, v, cos, sin, q_scale, k_scale), bias, keep, scale, rate, cap)
    return out.reshape(*out.shape[:2], -1), (q, k, v, bias, keep, cos, sin, q_scale, k_scale, probs)


def _attention_bwd(
    scale: float, rate: float, layout: tuple[int, int, int], norm: Callable | None, cap: float | None, res, g: Array
):
    q, k, v, bias, keep, cos, sin, q_scale, k_scale, probs = res
    # the grouped (normalised, rotated) q, k, v again from the arrays kept: the caller's own
    (q, k, v), regroup = jax.vjp(
        lambda q, k, v, qs, ks: _heads(layout, norm, q, k, v, cos, sin, qs, ks),
        *(after(t, g) for t in (q, k, v)), q_scale, k_scale,
    )
    probs = after(probs, g)
    g = g.reshape(q.shape)
    f32 = jnp.float32
    dv = jnp.einsum("bkgts,btkgd->bskd", _dropped(probs, keep, rate), g.astype(probs.dtype)).astype(v.dtype)
    dp = _dropped(jnp.einsum("btkgd,bskd->bkgts", g, v, preferred_element_type=f32), keep, rate)
    p32 = probs.astype(f32)
    ds = p32 * (dp - jnp.sum(dp * p32, axis=-1, keepdims=True))  # cotangent of the logits (scaled, biased)
    dbias = None
    if bias is not None:  # dead code unless the bias is differentiated
        axes = tuple(i for i, n in enumerate(bias.shape) if n == 1 and ds.shape[i] != 1)
        dbias = jnp.sum(ds, axis=axes, keepdims=True).astype(bias.dtype)
    if cap is not None:
        ds = ds * (1.0 - jnp.square(jnp.tanh(_logits(q, k, scale) / cap)))
    dq = (jnp.einsum("bkgts,bskd->btkgd", ds, k.astype(f32)) * scale).astype(q.dtype)
    dk = (jnp.einsum("bkgts,btkgd->bskd", ds, q.astype(f32)) * scale).astype(k.dtype)
    dq, dk, dv, dqs, dks = regroup((dq, dk, dv))
    return dq, dk, dv, dbias, None, None, None, dqs, dks


_attention.defvjp(_attention_fwd, _attention_bwd)


IMPLEMENTATIONS = ("auto", "custom", "fused")


def implementation(dropout: bool = False, softcap: bool = False) -> str:
    """``"custom"`` (this module's form) or ``"fused"`` (:func:`jax.nn.dot_product_attention`): by
    ``$SORA_JAX_ATTENTION``, else ``"fused"`` on a GPU without dropout and ``"custom"`` otherwise. Dropout
    on the probabilities and a logit cap always take the custom form (the fused one has neither)."""
    choice = os.environ.get("SORA_JAX_ATTENTION", "auto").strip().lower()
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"SORA_JAX_ATTENTION={choice!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    if dropout or softcap:
        return "custom"
    if choice == "auto":
        return "fused" if jax.default_backend() == "gpu" else "custom"
    return choice


def _attend(
    q: Array,
    k: Array,
    v: Array,
    layout: tuple[int, int, int],
    rotary: tuple[Array, Array] | None,
    qk_norm: tuple[Callable, Array, Array] | None,
    bias: Array | None,
    mask: Array | None,
    scale: float | None,
    dropout_rate: float,
    dropout_rng: Array | None,
    softcap: float | None,
) -> Array:
    """Both entry points: ``q: (B, T, ...)``, ``k, v: (B, S, ...)`` holding ``layout = (K, G, D)`` heads ->
    ``(B, T, K * G * D)``."""
    (B, T), (S, (K, G, D)) = q.shape[:2], (k.shape[1], layout)
    H = K * G
    for name, t in (("bias", bias), ("mask", mask)):
        if t is not None and (t.ndim != 4 or any(n not in (1, m) for n, m in zip(t.shape, (B, H, T, S), strict=True))):
            raise ValueError(f"{name} must be 4-D, broadcastable to (B, H, T, S) = {(B, H, T, S)}; got {t.shape}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"logit_softcap must be > 0 (or None: no cap), got {softcap}")
    if mask is not None:
        masked = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
        bias = masked if bias is None else bias.astype(jnp.float32) + masked
    dropped = dropout_rng is not None and dropout_rate > 0.0
    scale = float(D**-0.5 if scale is None else scale)
    cos, sin = (None, None) if rotary is None else rotary
    norm, q_scale, k_scale = (None, None, None) if qk_norm is None else qk_norm
    if implementation(dropped, softcap is not None) == "fused":
        qg, kg, vg = _heads(layout, norm, q, k, v, cos, sin, q_scale, k_scale)
        out = jax.nn.dot_product_attention(qg.reshape(B, T, H, D), kg, vg, bias=bias, scale=scale)
        return out.astype(q.dtype).reshape(B, T, H * D)
    if bias is not None:  # (B|1, H|1, T|1, S|1) -> (B|1, K|1, G|1, T|1, S|1)
        b0, h0, t0, s0 = bias.shape
        bias = bias.reshape(b0, 1, 1, t0, s0) if h0 == 1 else bias.reshape(b0, K, G, t0, s0)
    keep = None
    if dropped:
        keep = _dropout.bernoulli(dropout_rng, 1.0 - dropout_rate, (B, H, T, S)).reshape(B, K, G, T, S)
    cap = None if softcap is None else float(softcap)
    return _attention(q, k, v, bias, keep, cos, sin, q_scale, k_scale, scale, float(dropout_rate), layout, norm, cap)


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    logit_softcap: float | None = None,
) -> Array:
    """``drop(softmax(cap(Q K^T * scale) + bias)) V`` per head (module docstring): ``q: (B, T, H, D)``,
    ``k, v: (B, S, K, D)`` (``K`` divides ``H``), ``bias`` (additive) and ``mask`` (boolean, True = attend)
    4-D, broadcastable to ``(B, H, T, S)``; ``scale`` defaults to ``D ** -0.5``. Dropout on the
    probabilities when ``dropout_rng`` is given and ``dropout_rate > 0``; ``logit_softcap = c``: ``cap(x) =
    c tanh(x / c)`` (Gemma 2), none by default. Returns ``(B, T, H, D)``."""
    if not (
        q.ndim == k.ndim == 4
        and k.shape == v.shape
        and q.shape[0] == k.shape[0]
        and q.shape[3] == k.shape[3]
        and q.shape[2] % k.shape[2] == 0
    ):
        raise ValueError(
            f"expected q (B, T, H, D) and k, v (B, S, K, D) with K dividing H; got {q.shape}, {k.shape}, {v.shape}"
        )
    (B, T, H, D), K = q.shape, k.shape[2]
    out = _attend(
        q.reshape(B, T, K, H // K, D), k, v, (K, H // K, D), None, None, bias, mask, scale, dropout_rate, dropout_rng,
        logit_softcap,
    )
    return out.reshape(B, T, H, D)


def rotary_attention(
    q: Array,
    k: Array,
    v: Array,
    cos: Array,
    sin: Array,
    num_heads: int,
    num_kv_heads: int,
    mask: Array | None = None,
    scale: float | None = None,
    *,
    qk_norm: tuple[Callable, Array, Array] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    logit_softcap: float | None = None,
) -> Array:
    """:func:`dot_product_attention` of ``rotate(q), rotate(k), v`` (:func:`rotate`, ``cos, sin: (B, T, D)``) on
    the projections' outputs as they are: ``q: (B, T, H * D)``, ``k, v: (B, T, K * D)`` -> ``(B, T, H * D)``.
    ``qk_norm = (norm, q_scale, k_scale)``: each head of ``q`` is ``norm(q_h, q_scale)`` (and of ``k``) before
    the rotation, ``norm`` a hashable function, the scales ``(D,)`` (Gemma 3's QK-norm).

    The backward keeps ``q``, ``k`` and ``v`` themselves and rotates again, so a projection that keeps its own
    output for a gradient (the diagonal methods' fused layers) shares the array: under ``nn.scan``, whose
    residuals are JAX values, a reshaped or rotated copy would be kept beside it. The rotation costs an
    elementwise pass over ``q`` and ``k`` in the backward."""
    if not (
        q.ndim == k.ndim == 3
        and k.shape == v.shape
        and q.shape[:2] == k.shape[:2]
        and num_heads % num_kv_heads == 0
        and q.shape[2] % num_heads == 0
        and k.shape[2] == num_kv_heads * (q.shape[2] // num_heads)
    ):
        raise ValueError(
            f"expected q (B, T, {num_heads} * D) and k, v (B, T, {num_kv_heads} * D); got "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    D = q.shape[2] // num_heads
    if cos.shape != (*q.shape[:2], D) or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be (B, T, D) = {(*q.shape[:2], D)}; got {cos.shape}, {sin.shape}")
    layout = (num_kv_heads, num_heads // num_kv_heads, D)
    return _attend(q, k, v, layout, (cos, sin), qk_norm, None, mask, scale, dropout_rate, dropout_rng, logit_softcap)
