"""The activation path on a user's own Flax model, without editing its code.

Our models hand every dense layer to a ``dense_fn``; a user's linen or NNX model calls ``nn.Dense`` /
``nn.DenseGeneral`` (linen) or ``nnx.Linear`` / ``nnx.LinearGeneral`` (NNX) itself. Within these context
managers, each such layer whose path has adapter leaves computes its output with
:func:`sora_jax.adapted_dense` (the layer with the hand-written backward that never forms ``dL/dW'``)
on the matrix view of its kernel (:mod:`sora_jax.layout`: a ``DenseGeneral`` kernel is one matrix over
its feature axes); every other layer runs unchanged. Values and gradients equal
``apply_adapter`` on the same model (the layer's dtype promotion aside: the adapted layer computes in the
input's dtype).

- linen: ``with linen_activation_path(adapter): model.apply({"params": params}, x)`` (through
  ``flax.linen.intercept_methods``; module paths are the params tree's).
- NNX: ``with nnx_activation_path(model, adapter): model(x)`` (the layer classes' ``__call__`` is
  swapped for the duration; module paths are ``nnx.iter_graph(model)``'s, the same as ``nnx.split``'s state).

Stacked (scanned) layers are not supported here (a layer inside ``nn.scan`` cannot see its index): use
:func:`sora_jax.apply_adapter` for them; such a layer is an error naming it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sora_jax.adapter import Adapter
from sora_jax.config import AdapterError
from sora_jax.dense import adapted_dense

Array = jax.Array

__all__ = ["linen_activation_path", "nnx_activation_path"]


def _normalize(axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(a % ndim for a in axes)


def _layer(
    dense_fn: Callable[..., Array], adapter: Adapter, path: str, x: Array, kernel: Array, bias: Array | None,
    axis: Sequence[int] | int, n_features: int,
) -> Array:
    """``x`` contracted over ``axis`` with ``kernel: (*in_features, *features)`` (``n_features`` trailing axes)
    plus ``bias: features``, through the adapted layer on the kernel's ``(d_in, d_out)`` matrix."""
    leaves = adapter.layers[path]
    axes = _normalize(axis, x.ndim)
    in_shape, out_shape = kernel.shape[: kernel.ndim - n_features], kernel.shape[kernel.ndim - n_features :]
    d_in, d_out = math.prod(in_shape), math.prod(out_shape)
    if leaves["A"].shape != (d_in, leaves["A"].shape[-1]) or leaves["B"].shape[-1] != d_out:
        raise AdapterError(
            f"module {path!r}: the adapter's A {tuple(leaves['A'].shape)} / B {tuple(leaves['B'].shape)} do not fit "
            f"the layer's kernel {tuple(kernel.shape)} read as one ({d_in}, {d_out}) matrix"
            + (" (stacked layers: the activation path cannot see a scan index; use sora_jax.apply_adapter)"
               if leaves["A"].ndim > 2 else "; re-create the adapter with init_adapter for these params")
        )
    rest = [a for a in range(x.ndim) if a not in axes]
    xm = jnp.transpose(x, (*rest, *axes)).reshape(*(x.shape[a] for a in rest), d_in)
    b = None if bias is None else bias.reshape(d_out)
    y = dense_fn(tuple(path.split("/")), xm, kernel.reshape(d_in, d_out), b)
    return y.reshape(*y.shape[:-1], *out_shape)


@contextlib.contextmanager
def linen_activation_path(
    adapter: Adapter, dropout_rng: Array | None = None, fused: bool | None = None
) -> Iterator[None]:
    """Within the context, every ``flax.linen`` ``Dense``/``DenseGeneral`` whose params path (``attn/query``)
    has adapter leaves runs ``adapter`` on activations (:func:`sora_jax.adapted_dense`; ``dropout_rng`` and
    ``fused`` as there). Use it around ``model.apply`` inside the traced loss: ``jax.grad`` w.r.t. the
    adapter gives the same gradients as through ``apply_adapter``.

    Raises (at the layer): AdapterError for ``DenseGeneral`` with ``batch_dims`` or stacked adapter leaves.
    """
    import flax.linen as nn

    dense_fn = adapted_dense(adapter, dropout_rng=dropout_rng, fused=fused)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense | nn.DenseGeneral):
            return next_fun(*args, **kwargs)
        path = "/".join(str(p) for p in module.scope.path)
        if path not in adapter.layers or not module.has_variable("params", "kernel"):
            return next_fun(*args, **kwargs)
        kernel = module.get_variable("params", "kernel")
        bias = module.get_variable("params", "bias") if module.has_variable("params", "bias") else None
        (x,) = args
        if isinstance(module, nn.Dense):
            return _layer(dense_fn, adapter, path, x, kernel, bias, -1, 1)
        if module.batch_dims:
            raise AdapterError(
                f"module {path!r}: DenseGeneral with batch_dims={module.batch_dims} (kernel {tuple(kernel.shape)}) "
                f"is a batch of layers; the activation path adapts one matrix per module: use sora_jax.apply_adapter"
            )
        n_features = 1 if isinstance(module.features, int) else len(module.features)
        return _layer(dense_fn, adapter, path, x, kernel, bias, module.axis, n_features)

    with nn.intercept_methods(interceptor):
        yield


@contextlib.contextmanager
def nnx_activation_path(
    model: Any, adapter: Adapter, dropout_rng: Array | None = None, fused: bool | None = None
) -> Iterator[None]:
    """Within the context, calls of ``model``'s ``nnx.Linear``/``nnx.LinearGeneral`` layers whose path
    (``nnx.iter_graph``'s, the same as the keys of ``nnx.split(model)``'s state) has adapter leaves run
    ``adapter`` on activations (:func:`sora_jax.adapted_dense`). Other modules, and the same classes
    outside ``model``, run unchanged. The layer classes' ``__call__`` is swapped while the context is open
    (not thread-safe: one such context at a time).

    Raises: AdapterError when an adapted path is not a ``Linear``/``LinearGeneral`` of ``model``.
    """
    from flax import nnx

    dense_fn = adapted_dense(adapter, dropout_rng=dropout_rng, fused=fused)
    paths: dict[int, str] = {}
    for p, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear | nnx.LinearGeneral):
            paths[id(node)] = "/".join(str(k) for k in p)
    missing = sorted(set(adapter.layers) - set(paths.values()))
    if missing:
        raise AdapterError(
            f"adapter modules {missing} are no nnx.Linear/nnx.LinearGeneral of the model (its layers: "
            f"{sorted(paths.values())[:12]}); the activation path runs those two classes only: use "
            f"sora_jax.apply_adapter on nnx.split(model)'s state for other layers"
        )
    linear_call, general_call = nnx.Linear.__call__, nnx.LinearGeneral.__call__

    def bias_of(layer):
        return None if layer.bias is None else layer.bias[...]

    def linear(self, inputs, *args, **kwargs):
        path = paths.get(id(self))
        if path is None or path not in adapter.layers or args or kwargs.get("out_sharding") is not None:
            return linear_call(self, inputs, *args, **kwargs)
        return _layer(dense_fn, adapter, path, inputs, self.kernel[...], bias_of(self), -1, 1)

    def general(self, inputs, *args, **kwargs):
        path = paths.get(id(self))
        if path is None or path not in adapter.layers or args or kwargs.get("out_sharding") is not None:
            return general_call(self, inputs, *args, **kwargs)
        if self.batch_axis:
            raise AdapterError(
                f"module {path!r}: LinearGeneral with batch_axis={dict(self.batch_axis)} is a batch of layers; "
                f"use sora_jax.apply_adapter"
            )
        return _layer(dense_fn, adapter, path, inputs, self.kernel[...], bias_of(self), self.axis,
                      len(self.out_features))

    nnx.Linear.__call__, nnx.LinearGeneral.__call__ = linear, general
    try:
        yield
    finally:
        nnx.Linear.__call__, nnx.LinearGeneral.__call__ = linear_call, general_call
