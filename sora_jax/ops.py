"""Flax-free operations shared by the adapter core and the models.

- :func:`default_dense`: the frozen dense layer ``y = act(x) W + b``, the default *dense function* of the
  models (``dense_fn(path, x, kernel, bias, input_act=None) -> y``, :mod:`sora_jax.models.common`);
- :func:`takes_keyword`, :func:`takes_input_act`: whether a dense function accepts a keyword (``input_act``,
  ``layer``);
- activations by Hugging Face name (:mod:`sora_jax.activations`) and :func:`sora_jax.recompute.after` live
  beside this module, so that ``import sora_jax`` imports no Flax.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sora_jax.activations import activation

Array = jax.Array


def default_dense(
    path: tuple[str, ...], x: Array, kernel: Array, bias: Array | None, input_act: str | None = None
) -> Array:
    """``y = act(x) W + b`` with ``x`` flattened to ``(prod(batch), d_in)``. ``W: (d_in, d_out)``; ``act``: the
    activation named ``input_act`` (:data:`sora_jax.activations.ACTIVATIONS`), or none."""
    del path
    if input_act is not None:
        x = activation(input_act)(x)
    lead = x.shape[:-1]
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.reshape(*lead, kernel.shape[-1])


def takes_keyword(dense_fn: Callable[..., Array], name: str) -> bool:
    """Whether ``dense_fn`` accepts the keyword ``name`` (``input_act``, ``layer``; the contract in
    :mod:`sora_jax.models.common`)."""
    try:
        params = inspect.signature(dense_fn).parameters
    except (TypeError, ValueError):  # no signature to read: assume the plain contract
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def takes_input_act(dense_fn: Callable[..., Array]) -> bool:
    """Whether ``dense_fn`` accepts the ``input_act`` keyword (the contract in :mod:`sora_jax.models.common`)."""
    return takes_keyword(dense_fn, "input_act")
