"""Conditioning maps and methods: docs/spec.md section 2's framework ``W' = T_post(T_pre(W) + s A B)`` as data.

A conditioning map ``T`` acts on output features, one row at a time (``z -> z T`` for ``z: (..., d_out)``:
a weight ``W: (d_in, d_out)``, a bias, the layer's activations). Every map here has the form

    z T = z * scale + (z L) Rt,      scale: (d_out,),  L: (d_out, k),  Rt: (k, d_out),

either part absent: the identity has neither, a diagonal ``diag(v)`` only ``scale = v``, a rotation
``R = I + U Phi U^T`` (:mod:`sora_jax.rotation`) only ``L = U = [C, D]``, ``Rt = Phi U^T``. A :class:`Map`
declares its trained leaves and their initial values, the arrays the layer computes with (``params``:
a rotation's ``s_p``, DoRA's ``m / n``, differentiable functions of the leaves) and its
:class:`Factors`. The weight path (:func:`sora_jax.methods.effective`), the activation forward and the
hand-written backward (:mod:`sora_jax.dense`) are written once over this form: the backward takes the
gradients of ``scale``, ``L`` and ``Rt`` from activations, and a map's own leaves get theirs from
:func:`jax.vjp` of its ``factors`` (``O(d_out k)``).

A :class:`Method` is a pair ``(T_pre, T_post)``; the methods are registered in :mod:`sora_jax.methods`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sora_jax import rotation as rot

Array = jax.Array
Leaves = dict[str, Array]


class Factors(NamedTuple):
    """``z T = z * scale + (z L) Rt``; ``None``: that part is absent."""

    scale: Array | None = None  # (d_out,)
    L: Array | None = None  # (d_out, k)
    Rt: Array | None = None  # (k, d_out)


def _no_leaves(d_out: int, config: Any) -> dict[str, tuple[int, ...]]:
    return {}


def _no_params(leaves: Leaves, config: Any, colnorm_input: Callable[[], Array]) -> Leaves:
    return {}


def _identity_factors(params: Leaves) -> Factors:
    return Factors()


def _no_check(d_out: int, config: Any) -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class Map:
    """One conditioning map (module docstring).

    Attributes:
      name: what it is called in messages.
      leaf_shapes: ``(d_out, config) -> {leaf: shape}``; every shape starts with ``d_out`` (the axis a
        sharded kernel's ``d_out`` split follows).
      init: ``(key, W, config, dtype) -> {leaf: array}`` for one kernel ``W: (d_in, d_out)``: values with
        which the map is the identity (or, DoRA, equal to it on ``W``).
      params: ``(leaves, config, colnorm_input) -> {name: array}``: the arrays the layer computes with,
        from the leaves (in the compute dtype); ``colnorm_input()`` is the column norm of the map's input
        weight (DoRA's ``n``). Names must not clash with the other map's, ``A`` or ``Bs``.
      factors: ``params -> Factors``, differentiable.
      expand: ``(t, params) -> t Rt`` for ``t = z L: (..., k)`` in the map's own product order (``None``:
        ``t @ Rt``).
      thin: ``(z, params) -> z L`` in the map's own product order (``None``: ``z @ L``), for :meth:`apply`.
      reads_norm: ``params`` calls ``colnorm_input`` (DoRA's ``n``, a constant of the weights and leaves,
        which :func:`sora_jax.dense.input_norms` computes once for a loop of forward passes).
      conditions_bias: the bias goes through the map (docs/spec.md section 2: all but DoRA's normalised diagonal).
      frozen_input_dropped: with LoRA dropout, the map's frozen input is computed from the dropped input
        and the rest of the frozen output bypasses the map (DoRA, as PEFT computes it).
      check: ``(d_out, config) -> error text or None``, a shape the map cannot have.
      bind: ``config -> Map``, the map for a configuration's options (the rotation's kind).
      random_init: ``init`` draws from its key (a method has at most one such map).
      param_names: the keys ``params`` returns.
      scaled, low_rank: whether ``factors`` has a ``scale``, an ``L, Rt`` part.
    """

    name: str
    leaf_shapes: Callable[[int, Any], dict[str, tuple[int, ...]]] = _no_leaves
    init: Callable[..., Leaves] | None = None
    params: Callable[[Leaves, Any, Callable[[], Array]], Leaves] = _no_params
    factors: Callable[[Leaves], Factors] = _identity_factors
    expand: Callable[[Array, Leaves], Array] | None = None
    thin: Callable[[Array, Leaves], Array] | None = None
    reads_norm: bool = False
    conditions_bias: bool = True
    frozen_input_dropped: bool = False
    check: Callable[[int, Any], str | None] = _no_check
    bind: Callable[[Any], Map] | None = None
    random_init: bool = False
    param_names: tuple[str, ...] = ()
    scaled: bool = False
    low_rank: bool = False

    def apply(self, z: Array, params: Leaves, f: Factors | None = None, t: Array | None = None) -> Array:
        """``z T`` for ``z: (..., d_out)``; ``t = z L`` when the caller has it already."""
        f = self.factors(params) if f is None else f
        out = z if f.scale is None else z * f.scale
        if f.L is None:
            return out
        if t is None:
            t = z @ f.L if self.thin is None else self.thin(z, params)
        return out + (t @ f.Rt if self.expand is None else self.expand(t, params))

    def bound(self, config: Any) -> Map:
        return self if self.bind is None else self.bind(config)


@dataclasses.dataclass(frozen=True)
class Method:
    """A method: ``W' = T_post(T_pre(W) + s A B)`` with LoRA factors ``A (d_in, r)``, ``B (r, d_out)``."""

    name: str
    pre: Map
    post: Map

    def __post_init__(self) -> None:
        if self.pre.frozen_input_dropped or not self.pre.conditions_bias:
            raise ValueError(f"{self.name}: {self.pre.name} can only be T_post")
        if self.pre.random_init and self.post.random_init:
            raise ValueError(f"{self.name}: at most one map may draw its initial values at random")

    def bind(self, config: Any) -> Method:
        """The method with the options of ``config`` (the rotation's kind)."""
        return Method(self.name, self.pre.bound(config), self.post.bound(config))

    def leaf_shapes(self, d_in: int, d_out: int, r: int, config: Any) -> dict[str, tuple[int, ...]]:
        """``{leaf: shape}`` of one adapted ``(d_in, d_out)`` kernel."""
        return {"A": (d_in, r), "B": (r, d_out), **self.pre.leaf_shapes(d_out, config),
                **self.post.leaf_shapes(d_out, config)}


# -- the maps ------------------------------------------------------------------------------------------
IDENTITY = Map("identity")


def colnorm(M: Array) -> Array:
    """``colnorm(M)_j = ||M[:, j]||_2``: one value per output feature. ``M: (d_in, d_out)``."""
    return jnp.sqrt(jnp.sum(jnp.square(M), axis=0))


def diagonal(leaf: str) -> Map:
    """``diag(v)`` with ``v = leaves[leaf]: (d_out,)``, initialised to ones."""
    return Map(
        name=f"diagonal {leaf}",
        leaf_shapes=lambda d_out, config: {leaf: (d_out,)},
        init=lambda key, W, config, dtype: {leaf: jnp.ones((W.shape[1],), dtype)},
        params=lambda leaves, config, colnorm_input: {leaf: leaves[leaf]},
        factors=lambda p: Factors(scale=p[leaf]),
        param_names=(leaf,),
        scaled=True,
    )


def _normalised_params(leaves: Leaves, config: Any, colnorm_input: Callable[[], Array]) -> Leaves:
    m = leaves["m"]
    n = jax.lax.stop_gradient(colnorm_input())
    return {"k": (m.astype(jnp.promote_types(m.dtype, n.dtype)) / n).astype(m.dtype)}


# DoRA's ``diag(m / n)``, ``n = stop_gradient(colnorm(input))``, ``m`` initialised to ``colnorm(W)``; the
# bias is not scaled, and with LoRA dropout the frozen input the magnitude sees is the dropped one (PEFT)
NORMALISED_DIAGONAL = Map(
    name="normalised diagonal",
    leaf_shapes=lambda d_out, config: {"m": (d_out,)},
    init=lambda key, W, config, dtype: {"m": colnorm(W.astype(jnp.float32)).astype(dtype)},
    params=_normalised_params,
    factors=lambda p: Factors(scale=p["k"]),
    reads_norm=True,
    conditions_bias=False,
    frozen_input_dropped=True,
    param_names=("k",),
    scaled=True,
)


def _rotation_init(key: Array, W: Array, config: Any, dtype: Any) -> Leaves:
    d_out = W.shape[1]
    bound = 1.0 / jnp.sqrt(d_out)
    C = jax.random.uniform(key, (d_out, config.rotation_rank), dtype, -bound, bound)
    return {"C": C, "D": C}


def _rotation_check(d_out: int, config: Any) -> str | None:
    if 2 * config.rotation_rank > d_out:
        return (f"rotation_rank={config.rotation_rank} is too large for module {{path!r}} (d_out={d_out}): the "
                f"rotation generator has rank 2*rotation_rank, which must be <= d_out; lower rotation_rank")
    return None


@functools.cache
def rotation(kind: str = "taylor") -> Map:
    """``R = I + U Phi U^T`` from ``C, D: (d_out, r_p)`` (:mod:`sora_jax.rotation`), ``kind`` one of
    ``taylor`` (``z R = z + s_p ((z C) D^T - (z D) C^T)``, the paper's), ``cayley``, ``exp``."""

    def factors(p: Leaves) -> Factors:
        C, D, sp = p["C"], p["D"], p["sp"]
        if kind == "taylor":
            return Factors(L=jnp.concatenate([C, D], axis=1), Rt=sp * jnp.concatenate([D.T, -C.T], axis=0))
        U, Phi = rot.core(C, D, sp, kind)
        return Factors(L=U, Rt=Phi @ U.T)

    def expand(t: Array, p: Leaves) -> Array:
        C, D, sp = p["C"], p["D"], p["sp"]
        if kind == "taylor":  # two rank-r_p products whose difference is exactly 0 when C == D (init)
            r_p = C.shape[1]
            return rot.taylor_term(t[..., :r_p], t[..., r_p:], C, D, sp)
        U, Phi = rot.core(C, D, sp, kind)
        return (t @ Phi) @ U.T

    return Map(
        name=f"rotation ({kind})",
        leaf_shapes=lambda d_out, config: {"C": (d_out, config.rotation_rank), "D": (d_out, config.rotation_rank)},
        init=_rotation_init,
        params=lambda leaves, config, colnorm_input: {
            "C": leaves["C"], "D": leaves["D"], "sp": rot.s_p(leaves["C"], leaves["D"], config.initial_s_p)},
        factors=factors,
        expand=expand,
        thin=(lambda z, p: jnp.concatenate([z @ p["C"], z @ p["D"]], axis=-1)) if kind == "taylor" else None,
        check=_rotation_check,
        bind=lambda config: rotation(config.rotation),
        random_init=True,
        param_names=("C", "D", "sp"),
        low_rank=True,
    )
