"""Recomputation in a hand-written backward pass that XLA cannot merge back into the forward.

A :func:`jax.custom_vjp` backward that recomputes a value from a kept residual (an activation from its
input, a transposed copy of a tensor) saves memory only if the recomputation runs in the backward pass.
XLA's common-subexpression pass merges it with the forward's identical computation otherwise, and the
forward's result then stays alive until the backward. An optimisation barrier is not enough: XLA's CPU
backend expands barriers before its last CSE pass (experiments/PERF.md, change 12). :func:`after` ties a
value to the cotangent by a data dependency instead.

:func:`recomputed` is a function whose backward keeps only its arguments and recomputes the rest (a gated
MLP's product, a norm handed to several layers): autodiff would keep the intermediates it needs instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def after(x: Array, g: Array) -> Array:
    """``x`` (exactly, for a finite ``g``), as a value that exists only once the cotangent ``g`` does:
    ``x + 0 g_0`` (``x`` itself for an empty ``g``). A recomputation from the result happens in the
    backward pass and is not merged with the forward's."""
    if g.size == 0:
        return x
    return x + jnp.zeros((), x.dtype) * g[(0,) * g.ndim].astype(x.dtype)


@functools.cache
def recomputed(fn: Callable[..., Array]) -> Callable[..., Array]:
    """``fn`` (a hashable function of arrays, returning one array) whose backward keeps only the arguments
    and recomputes ``fn``'s intermediates from them, after the cotangent exists (:func:`after`). Reverse-mode
    differentiable only (a :func:`jax.custom_vjp`)."""

    @jax.custom_vjp
    def f(*args: Array) -> Array:
        return fn(*args)

    def fwd(*args: Array) -> tuple[Array, tuple[Array, ...]]:
        return fn(*args), args

    def bwd(args: tuple[Array, ...], g: Array) -> tuple[Array, ...]:
        _, vjp = jax.vjp(fn, *(after(a, g) for a in args))
        return vjp(g)

    f.defvjp(fwd, bwd)
    return f
