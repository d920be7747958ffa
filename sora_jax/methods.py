"""The methods, each a pair ``(T_pre, T_post)`` of conditioning maps (:mod:`sora_jax.conditioning`), and the
weight path of one adapted layer (docs/spec.md section 2's table):

| method     | ``T_pre``  | ``T_post``           | ``W'``                          | ``b'``         |
|------------|------------|----------------------|---------------------------------|----------------|
| lora       | id         | id                   | ``W + s A B``                   | ``b``          |
| dora       | id         | normalised diagonal  | ``(W + s A B) diag(m / n)``     | ``b``          |
| prediag    | diagonal   | id                   | ``W diag(d) + s A B``           | ``d * b``      |
| pre_ortho  | rotation   | id                   | ``W R + s A B``                 | ``b R``        |
| post_ortho | id         | rotation             | ``(W + s A B) R``               | ``b R``        |
| sora       | diagonal   | rotation             | ``(W diag(d) + s A B) R``       | ``(d * b) R``  |
| post_diag  | id         | diagonal             | ``(W + s A B) diag(v)``         | ``v * b``      |

with ``n = stop_gradient(colnorm(W + s A B))`` and ``R`` from :mod:`sora_jax.rotation`;
every method is one entry of :data:`TABLE`.

All functions act on one 2-D kernel ``W: (d_in, d_out)`` and its bias ``b: (d_out,)``; stacked kernels
are handled by the caller with ``jax.vmap``. Leaves: ``A (d_in, r)``, ``B (r, d_out)`` and the maps'
(``m (d_out,)``, ``d (d_out,)``, ``C, D (d_out, r_p)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sora_jax import post_diag
from sora_jax.conditioning import IDENTITY, NORMALISED_DIAGONAL, Method, colnorm, diagonal, rotation
from sora_jax.config import AdapterConfig

Array = jax.Array

__all__ = ["METHODS", "TABLE", "colnorm", "effective", "get", "init_leaves"]

TABLE: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", IDENTITY, IDENTITY),
        Method("dora", IDENTITY, NORMALISED_DIAGONAL),
        Method("prediag", diagonal("d"), IDENTITY),
        Method("sora", diagonal("d"), rotation()),
        Method("pre_ortho", rotation(), IDENTITY),
        Method("post_ortho", IDENTITY, rotation()),
        post_diag.METHOD,
    )
}
METHODS: tuple[str, ...] = tuple(TABLE)


def get(config: AdapterConfig) -> Method:
    """The :class:`~sora_jax.conditioning.Method` of ``config``, with its options (the rotation's kind)."""
    return TABLE[config.method].bind(config)


def init_leaves(key: Array, W: Array, config: AdapterConfig, r: int, dtype=jnp.float32) -> dict[str, Array]:
    """Initial leaves for one kernel ``W: (d_in, d_out)`` (docs/spec.md "LoRA factors", "DoRA", "Pre-Diag",
    "The rotation"): ``A ~ U(+-1/sqrt(d_in))``, ``B = 0`` and the maps' (``m = colnorm(W)``, ``d = 1``,
    ``C ~ U(+-1/sqrt(d_out))``, ``D = C``). The adapted layer equals the frozen one."""
    method = get(config)
    d_in, d_out = W.shape
    k_a, k_c = jax.random.split(key)
    bound = 1.0 / jnp.sqrt(d_in)
    leaves = {
        "A": jax.random.uniform(k_a, (d_in, r), dtype, -bound, bound),
        "B": jnp.zeros((r, d_out), dtype),
    }
    for m in (method.pre, method.post):
        if m.init is not None:
            leaves.update(m.init(k_c, W, config, dtype))
    return leaves


def effective(
    W: Array, b: Array | None, leaves: dict[str, Array], config: AdapterConfig, scaling: float
) -> tuple[Array, Array | None]:
    """``(W', b')``: ``W' = T_post(T_pre(W) + s A B)`` and the bias through the maps that condition it,
    computed in ``W``'s dtype. ``W: (d_in, d_out)``, ``b: (d_out,)``."""
    method = get(config)
    dt = W.dtype
    lv = {k: v.astype(dt) for k, v in leaves.items()}
    pre_p = method.pre.params(lv, config, lambda: colnorm(W))
    Z = method.pre.apply(W, pre_p) + scaling * (lv["A"] @ lv["B"])
    bz = None if b is None else method.pre.apply(b, pre_p)
    post_p = method.post.params(lv, config, lambda: colnorm(Z))
    W_eff = method.post.apply(Z, post_p)
    if bz is not None and method.post.conditions_bias:
        bz = method.post.apply(bz, post_p)
    return W_eff, bz
