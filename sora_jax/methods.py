"""One adapted layer: initial adapter leaves and the effective weight (SPEC section 2's table).

All functions act on one 2-D kernel ``W: (d_in, d_out)`` and its bias ``b: (d_out,)``; stacked kernels
are handled by the caller with ``jax.vmap``. Leaves: ``A (d_in, r)``, ``B (r, d_out)``,
``m (d_out,)``, ``d (d_out,)``, ``C, D (d_out, r_p)``.

| method     | ``W'``                          | ``b'``         |
|------------|---------------------------------|----------------|
| lora       | ``W + s A B``                   | ``b``          |
| dora       | ``(W + s A B) diag(m / n)``     | ``b``          |
| prediag    | ``W diag(d) + s A B``           | ``d * b``      |
| pre_ortho  | ``W R + s A B``                 | ``b R``        |
| post_ortho | ``(W + s A B) R``               | ``b R``        |
| sora       | ``(W diag(d) + s A B) R``       | ``(d * b) R``  |

with ``n = stop_gradient(colnorm(W + s A B))`` and ``R`` from :mod:`sora_jax.rotation`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sora_jax.config import AdapterConfig
from sora_jax.rotation import rotate

Array = jax.Array


def colnorm(M: Array) -> Array:
    """``colnorm(M)_j = ||M[:, j]||_2``: one value per output feature. ``M: (d_in, d_out)``."""
    return jnp.sqrt(jnp.sum(jnp.square(M), axis=0))


def init_leaves(key: Array, W: Array, config: AdapterConfig, r: int, dtype=jnp.float32) -> dict[str, Array]:
    """Initial leaves for one kernel ``W: (d_in, d_out)`` (SPEC "LoRA factors", "DoRA", "Pre-Diag",
    "The rotation"): ``A ~ U(+-1/sqrt(d_in))``, ``B = 0``, ``m = colnorm(W)``, ``d = 1``,
    ``C ~ U(+-1/sqrt(d_out))``, ``D = C``. The adapted layer equals the frozen one."""
    d_in, d_out = W.shape
    k_a, k_c = jax.random.split(key)
    bound = 1.0 / jnp.sqrt(d_in)
    leaves = {
        "A": jax.random.uniform(k_a, (d_in, r), dtype, -bound, bound),
        "B": jnp.zeros((r, d_out), dtype),
    }
    if config.has_magnitude:
        leaves["m"] = colnorm(W.astype(jnp.float32)).astype(dtype)
    if config.has_diag:
        leaves["d"] = jnp.ones((d_out,), dtype)
    if config.has_rotation:
        bound = 1.0 / jnp.sqrt(d_out)
        C = jax.random.uniform(k_c, (d_out, config.rotation_rank), dtype, -bound, bound)
        leaves["C"] = C
        leaves["D"] = C
    return leaves


def condition(
    method: str,
    W: Array,
    b: Array | None,
    AB: Array,
    d: Array | None = None,
    dora_scale: Callable[[Array], Array] | None = None,
    rot: Callable[[Array], Array] | None = None,
) -> tuple[Array, Array | None]:
    """SPEC section 2's table from its pieces: ``W: (d_in, d_out)``, ``b: (d_out,)``, the low-rank update
    ``AB = s A B: (d_in, d_out)``, the diagonal ``d (d_out,)`` (Pre-Diag, SORA), DoRA's column scale
    ``dora_scale(W + s A B) -> (d_out,)`` and the rotation ``rot(z) = z R`` on rows (Pre-/Post-Ortho, SORA).

    Returns ``(W', b')``: ``T_post(T_pre(W) + s A B)`` and the bias conditioned the same way."""
    if d is not None:
        W = W * d
        b = None if b is None else b * d
    if method == "pre_ortho":
        W = rot(W)
        b = None if b is None else rot(b)
    W = W + AB
    if method == "dora":
        W = W * dora_scale(W)
    if method in ("sora", "post_ortho"):
        W = rot(W)
        b = None if b is None else rot(b)
    return W, b


def effective(
    W: Array, b: Array | None, leaves: dict[str, Array], config: AdapterConfig, scaling: float
) -> tuple[Array, Array | None]:
    """``(W', b')`` of SPEC section 2's table, computed in ``W``'s dtype. ``W: (d_in, d_out)``."""
    dt = W.dtype
    lv = {k: v.astype(dt) for k, v in leaves.items()}
    return condition(
        config.method,
        W,
        b,
        scaling * (lv["A"] @ lv["B"]),
        d=lv.get("d") if config.has_diag else None,
        dora_scale=lambda V: lv["m"] / jax.lax.stop_gradient(colnorm(V)),
        rot=lambda z: rotate(z, lv["C"], lv["D"], config.initial_s_p, config.rotation),
    )

