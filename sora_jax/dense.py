"""Activation-side execution: the adapted layer computed on activations, never forming ``W'``.

The same layer as :func:`sora_jax.apply_adapter` (SPEC section 2), for ``x: (N, d_in)``,
``y = x W`` (one frozen matmul) and ``u = s drop(x) A B``:

| method     | output                                   |
|------------|------------------------------------------|
| lora       | ``y + b + u``                            |
| dora       | ``(m / n) * (y + u) + b``                |
| prediag    | ``d * (y + b) + u``                      |
| pre_ortho  | ``(y + b) R + u``                        |
| post_ortho | ``(y + b + u) R``                        |
| sora       | ``(d * (y + b) + u) R``                  |

``z R = z + ((z U) Phi) U^T`` (``taylor``: ``z + s_p ((z C) D^T - (z D) C^T)``). DoRA's column norm
comes from the factors: ``n_j^2 = ||w_j||^2 + 2 s (W^T A B)_jj + s^2 ||(A B)_j||^2``, which costs
``O(r d_in d_out)`` once per step, not per token, and is a constant of the backward pass
(``stop_gradient``). With dropout 0 both paths agree to float32 rounding.

Pass the result of :func:`adapted_dense` as a sora-jax model's ``dense_fn``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sora_jax.adapter import Adapter
from sora_jax.models.common import default_dense
from sora_jax.rotation import rotate

Array = jax.Array


def dora_norm(W: Array, A: Array, B: Array, s: float) -> Array:
    """``colnorm(W + s A B)`` from factors: ``W: (d_in, d_out)``, ``A: (d_in, r)``, ``B: (r, d_out)``.

    ``n_j^2 = ||w_j||^2 + 2 s sum_k (A^T W)_kj B_kj + s^2 sum_k B_kj (A^T A B)_kj``. Computed in float32.
    """
    W, A, B = (t.astype(jnp.float32) for t in (W, A, B))
    sq = jnp.sum(W * W, axis=0) + 2 * s * jnp.sum((A.T @ W) * B, axis=0) + s * s * jnp.sum(B * ((A.T @ A) @ B), axis=0)
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def adapted_layer(
    x: Array,
    kernel: Array,
    bias: Array | None,
    leaves: dict[str, Array],
    config,
    scaling: float,
    dropout_key: Array | None = None,
) -> Array:
    """One adapted dense layer on activations. ``x: (..., d_in)``, ``kernel: (d_in, d_out)`` -> ``(..., d_out)``."""
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    dt = x.dtype
    W = kernel.astype(dt)
    lv = {k: v.astype(dt) for k, v in leaves.items()}
    y = jnp.dot(x, W)
    xd = x
    if dropout_key is not None and config.lora_dropout > 0.0:
        keep = 1.0 - config.lora_dropout
        mask = jax.random.bernoulli(dropout_key, keep, x.shape)
        xd = jnp.where(mask, x / keep, 0).astype(dt)
    u = scaling * ((xd @ lv["A"]) @ lv["B"])
    b = None if bias is None else bias.astype(dt)
    method = config.method

    def rot(z: Array) -> Array:
        return rotate(z, lv["C"], lv["D"], config.initial_s_p, config.rotation)

    if method == "dora":
        n = jax.lax.stop_gradient(dora_norm(kernel, leaves["A"], leaves["B"], scaling))
        out = (leaves["m"].astype(jnp.float32) / n).astype(dt) * (y + u)
        if b is not None:
            out = out + b
    else:
        z = y if b is None else y + b
        if config.has_diag:
            z = lv["d"] * z
        if method == "pre_ortho":
            z = rot(z)
        z = z + u
        if method in ("sora", "post_ortho"):
            z = rot(z)
        out = z
    return out.reshape(*lead, out.shape[-1])


def adapted_dense(adapter: Adapter, dropout_rng: Array | None = None) -> Callable[..., Array]:
    """A model ``dense_fn(path, x, kernel, bias)`` that runs ``adapter`` on activations.

    Modules without adapter leaves compute ``x W + b``. ``dropout_rng``: a key for LoRA dropout
    (``config.lora_dropout``), folded with each module's path; ``None`` disables dropout (evaluation).
    Stacked kernels are not supported here (use :func:`sora_jax.apply_adapter`).
    """
    config = adapter.config

    def dense_fn(path: tuple[str, ...], x: Array, kernel: Array, bias: Array | None) -> Array:
        key = "/".join(path)
        leaves = adapter.layers.get(key)
        if leaves is None:
            return default_dense(path, x, kernel, bias)
        if kernel.ndim != 2:
            raise ValueError(f"activation path needs a 2-D kernel at {key!r}, got {kernel.shape}")
        k = None if dropout_rng is None else jax.random.fold_in(dropout_rng, zlib.crc32(key.encode()))
        return adapted_layer(x, kernel, bias, leaves, config, config.scaling_for(key), k)

    return dense_fn
