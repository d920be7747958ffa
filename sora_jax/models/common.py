"""Building blocks shared by the Flax models.

The models know nothing of adapters. Every dense layer is a :class:`Linear`, which declares its
``kernel`` ``(d_in, d_out)`` and ``bias`` ``(d_out,)`` and hands the actual computation to a
*dense function* supplied from outside (``dense_fn``)::

    dense_fn(path, x, kernel, bias) -> y        # x: (..., d_in), y: (..., d_out)
    dense_fn(path, x, kernel, bias, input_act="gelu")   # y = act(x) W + b
    dense_fn(path, x, kernel, bias, input_act="silu", gate=g)   # y = (act(g) * x) W + b
    dense_fn(path, x, kernel, bias, input_norm=(norm, scale))   # y = norm(x, scale) W + b

``path`` is the module's path in the parameter tree (``("bert", "encoder", "layer_0", "attention",
"self", "query")``). The default, :func:`sora_jax.ops.default_dense`, computes ``x W + b`` on activations
flattened to 2-D (XLA's CPU backend runs thin matmuls on 3-D activations much slower). An adapter
library can pass its own dense function to run adapters on activations without the model importing
it.

A layer whose input is an activation's output (a transformer FFN's second layer) is handed the
pre-activation and the activation's name (``input_act``, a key of :data:`ACTIVATIONS`): a dense function
that keeps its input for a gradient can then keep the pre-activation, which the activation's own
derivative keeps anyway, and recompute the activation. A gated MLP's output layer is handed both factors
of its input ``act(gate) * x`` (``gate=``), the two tensors the product's own backward keeps
(:func:`sora_jax.activations.gated`). A pre-norm block's projections are handed the residual stream and
the norm (``input_norm=(norm, scale)``, ``norm`` a hashable function, ``scale`` its parameter): the frozen
backward keeps the norm's input anyway, so a dense function can keep it instead of the normalised input and
normalise again in its backward. A dense function without one of these keywords is handed the input
itself (``act(x)``, ``act(gate) * x``, ``norm(x, scale)``).

Scanned layers (:func:`scan_blocks`): a model built with ``scan_layers=True`` runs its ``L`` identical
blocks under ``nn.scan``: one compiled block instead of ``L`` (compile time independent of depth), with
each parameter stacked along a leading axis, ``encoder/layer/.../kernel (L, d_in, d_out)`` for Hugging
Face's ``encoder.layer.N....weight`` (:func:`sora_jax.convert.stack_layers`). Inside the scan a block
sees its own ``(d_in, d_out)`` slice, and calls ``dense_fn(..., layer=i)`` with its index ``i`` (a traced
integer) when the dense function accepts ``layer``: an adapter's stacked leaves are sliced with it.

Naming convention (so that Hugging Face conversion is one generic table, see ``sora_jax.convert``):
a parameter path is the Hugging Face name with ``.`` replaced by ``/`` and ``layer.N`` written
``layer_N``; leaf names are ``kernel`` (a transposed ``nn.Linear.weight``), ``bias``, ``scale`` (a
norm's ``weight``) and ``embedding`` (an ``nn.Embedding.weight``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sora_jax import dropout
from sora_jax.activations import ACTIVATIONS, activation  # noqa: F401 (re-exported)
from sora_jax.ops import default_dense, layer_input, takes_input_act, takes_keyword  # noqa: F401 (re-exported)

Array = jax.Array


def at_layer(dense_fn: Callable[..., Array], index: Array | None) -> Callable[..., Array]:
    """``dense_fn`` for block ``index`` of a scanned stack: ``layer=index`` is passed to a dense function
    that takes ``layer`` (an adapter's stacked leaves are sliced with it); others are returned as they are."""
    if index is None or not takes_keyword(dense_fn, "layer"):
        return dense_fn
    return functools.partial(dense_fn, layer=index)


REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def _remat_policy(name: str) -> Callable[..., Any] | None:
    return {
        "full": None,  # save nothing: recompute the whole block in the backward pass
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


def scan_blocks(
    block: nn.Module,
    carry: Any,
    length: int,
    *args: Any,
    remat: str = "none",
    scanned: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Run ``block`` (a module whose parameters get a leading axis of ``length``) ``length`` times under
    ``nn.scan``: ``block(carry, *args, index=i, **kwargs, **slices_i)`` for ``i = 0 .. length-1``, each call
    returning the next carry, or ``(carry, y_i)``. ``scanned``: ``{name: xs}``, pytrees of ``(length, ...)``
    arrays whose ``i``-th slices are passed as ``name=`` (a stacked key/value cache, per-layer masks; a
    ``None`` value is passed as ``None``). ``args``/``kwargs`` are the same for every block. Returns
    ``(carry, the y_i stacked, or None)``.

    ``remat``: ``"none"`` keeps what autodiff keeps; ``"full"`` recomputes the block in the backward pass
    (only its input is kept); ``"dots"`` / ``"dots_no_batch"`` keep matmul outputs
    (``jax.checkpoint_policies``). Dropout and parameter initialisation get a separate key per block."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
    xs = dict(scanned or {})

    def body(module: nn.Module, c: Any, step: tuple[Array, dict[str, Any]]) -> tuple[Any, Any]:
        index, slices = step
        out = module(c, *args, index=index, **kwargs, **slices)
        return out if isinstance(out, tuple) else (out, None)

    if remat != "none":
        body = nn.remat(body, prevent_cse=False, policy=_remat_policy(remat))
    # no constancy check: it traces the block once more (about a fifth of a train step's tracing time) and
    # is needed only for broadcast (non-carry) outputs, which no block has
    scan = nn.scan(
        body,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        length=length,
        check_constancy_invariants=False,
    )
    return scan(block, carry, (jnp.arange(length), xs))


class Dropout(nn.Module):
    """Flax's ``nn.Dropout`` (same fields, same call, same name in the module tree and so the same
    ``make_rng`` key and mask) with the mask from :func:`sora_jax.dropout.bernoulli`, whose Threefry hash
    XLA:CPU runs several times faster than ``jax.random.bernoulli``'s."""

    rate: float
    broadcast_dims: tuple[int, ...] = ()
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool | None = None, rng: Array | None = None) -> Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        return dropout.dropout(inputs, self.rate, rng, self.broadcast_dims)


class Linear(nn.Module):
    """A dense layer whose computation is delegated to ``dense_fn`` (see module docstring).

    Params: ``kernel (d_in, features)``, ``bias (features,)`` when ``use_bias``. ``input_act``: the layer
    computes ``act(x) W + b`` for that activation, or ``(act(gate) * x) W + b`` when called with ``gate``;
    called with ``input_norm=(norm, scale)``, ``norm(x, scale) W + b``. These are handed to ``dense_fn``
    when it takes the keywords, applied here otherwise.
    """

    features: int
    use_bias: bool = True
    dense_fn: Callable[..., Array] = default_dense
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., Array] = nn.initializers.normal(0.02)
    input_act: str | None = None

    @nn.compact
    def __call__(self, x: Array, gate: Array | None = None, input_norm: Any = None) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        path = tuple(self.path)
        if gate is not None and self.input_act is None:
            raise ValueError(f"{'/'.join(path)}: a gated input needs its activation: set input_act")
        x = x.astype(self.dtype)
        gate = None if gate is None else gate.astype(self.dtype)
        extra = {"input_act": self.input_act, "gate": gate, "input_norm": input_norm}
        extra = {k: v for k, v in extra.items() if v is not None}
        if all(takes_keyword(self.dense_fn, k) for k in extra):
            return self.dense_fn(path, x, kernel, bias, **extra)
        return self.dense_fn(path, layer_input(x, **extra), kernel, bias)


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What the loader needs to know about one architecture family.

    Attributes:
      model_types: Hugging Face ``config.model_type`` values this family serves.
      build: ``build(hf_config, task, dtype, dense_fn) -> nn.Module``; ``task`` is one of
        ``"base"``, ``"sequence_classification"``, ``"causal_lm"`` (those in ``tasks``).
      tasks: the tasks ``build`` supports.
      base_model_prefix: Hugging Face's ``base_model_prefix`` (``"bert"``, ``"deberta"``, ``"model"``).
      head_prefixes: top-level parameter names that belong to a task head (initialised when a
        checkpoint lacks them, reported to the user).
      ignore_hf_keys: regexes of checkpoint keys skipped when the model has no such parameter (buffers,
        pre-training heads, a pooler that the task's model lacks).
      tied: ``{our_path: source_path}`` for parameters that may be tied to another in the checkpoint
        (``lm_head/kernel`` from the input embedding when ``tie_word_embeddings``).
      init_if_missing: ``/``-joined path prefixes of non-head parameters that are initialised (and
        reported) when a checkpoint lacks them, as ``transformers`` does (a base model's pooler loaded
        from a checkpoint of a task model that has none).
      layer_stack: the path of the repeated blocks under the base model (``"encoder/layer"`` for
        ``bert/encoder/layer_N``): built with ``scan_layers=True`` they are one stacked module there.
    """

    model_types: tuple[str, ...]
    build: Callable[..., nn.Module]
    tasks: tuple[str, ...]
    base_model_prefix: str
    head_prefixes: tuple[str, ...] = ()
    ignore_hf_keys: tuple[str, ...] = ()
    tied: tuple[tuple[str, str], ...] = ()
    init_if_missing: tuple[str, ...] = ()
    layer_stack: str | None = None
