"""Flax-free operations shared by the adapter core and the models.

- :func:`default_dense`: the frozen dense layer ``y = u W + b`` on the input ``u`` the model describes, the
  default *dense function* of the models (``dense_fn(path, x, kernel, bias, input_act=None, gate=None,
  input_norm=None) -> y``, :mod:`sora_jax.models.common`);
- :func:`layer_input`: that input, ``x``, ``act(x)``, ``act(gate) * x`` or ``norm(x, scale)``, formed from
  :func:`input_parts` (the function and its arguments, which an adapted layer keeps instead);
- :func:`takes_keyword`, :func:`takes_input_act`: whether a dense function accepts a keyword (``input_act``,
  ``gate``, ``input_norm``, ``layer``);
- activations by Hugging Face name (:mod:`sora_jax.activations`) and :func:`sora_jax.recompute.after` live
  beside this module, so that ``import sora_jax`` imports no Flax.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sora_jax.activations import GatedProduct, activation
from sora_jax.recompute import recomputed

Array = jax.Array


InputNorm = tuple[Callable[[Array, Array], Array], Array]  # (norm, scale): the input is norm(x, scale)


def input_parts(
    x: Array, input_act: str | None = None, gate: Array | None = None, input_norm: InputNorm | None = None
) -> tuple[Callable[..., Array] | None, tuple[Array, ...]]:
    """``(fn, args)``: a dense layer's input is ``fn(*args)`` (``x`` itself for ``fn = None``), from what the
    model hands it: ``act`` of ``(x,)`` for the activation named ``input_act``
    (:data:`sora_jax.activations.ACTIVATIONS`); with ``gate`` (``x``'s shape), a gated MLP's ``act(gate) * x``,
    :class:`sora_jax.activations.GatedProduct` of ``(x, gate)``; with ``input_norm = (norm, scale)``, a
    pre-norm block's ``norm`` of ``(x, scale)`` (``norm``: a hashable function of the residual stream
    ``x (..., d)`` and the norm's parameter ``scale (d,)``). Every ``fn`` is hashable."""
    if input_norm is not None:
        if input_act is not None or gate is not None:
            raise ValueError("input_norm describes the whole input: pass it without input_act or gate")
        norm, scale = input_norm
        return norm, (x, scale)
    if gate is not None:
        if input_act is None:
            raise ValueError("a gated input needs its activation: pass input_act with gate")
        return GatedProduct(input_act), (x, gate)
    return (None if input_act is None else activation(input_act)), (x,)


def layer_input(
    x: Array, input_act: str | None = None, gate: Array | None = None, input_norm: InputNorm | None = None
) -> Array:
    """A dense layer's input ``fn(*args)`` (:func:`input_parts`). A gated product or a norm keeps only its
    arguments for the backward (:func:`sora_jax.recompute.recomputed`; several layers reading one norm keep
    one ``x``); an activation keeps its argument through its written-out derivative."""
    fn, args = input_parts(x, input_act, gate, input_norm)
    if fn is None:
        return x
    return fn(x) if len(args) == 1 else recomputed(fn)(*args)


def default_dense(
    path: tuple[str, ...],
    x: Array,
    kernel: Array,
    bias: Array | None,
    input_act: str | None = None,
    gate: Array | None = None,
    input_norm: InputNorm | None = None,
) -> Array:
    """``y = u W + b``, ``u = layer_input(x, input_act, gate, input_norm)`` (``x``, ``act(x)``,
    ``act(gate) * x`` or ``norm(x, scale)``), flattened to ``(prod(batch), d_in)``. ``W: (d_in, d_out)``."""
    del path
    x = layer_input(x, input_act, gate, input_norm)
    lead = x.shape[:-1]
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.reshape(*lead, kernel.shape[-1])


def takes_keyword(dense_fn: Callable[..., Array], name: str) -> bool:
    """Whether ``dense_fn`` accepts the keyword ``name`` (``input_act``, ``gate``, ``input_norm``, ``layer``;
    the contract in :mod:`sora_jax.models.common`)."""
    try:
        params = inspect.signature(dense_fn).parameters
    except (TypeError, ValueError):  # no signature to read: assume the plain contract
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def takes_input_act(dense_fn: Callable[..., Array]) -> bool:
    """Whether ``dense_fn`` accepts the ``input_act`` keyword (the contract in :mod:`sora_jax.models.common`)."""
    return takes_keyword(dense_fn, "input_act")
