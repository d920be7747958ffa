"""Fine-tuning a sequence classifier with an adapter (or in full): optimizer, jitted steps, the loop.

The trainable state is small and separate from the frozen model::

    trainable = {"adapter": Adapter, "head": {...}}     # adapter methods
    trainable = {"base": {...}, "head": {...}}          # method="full" (every parameter)

``head`` is the subtree of the parameters named by ``modules_to_save`` (a task head such as BERT's
``classifier``; the pooler stays frozen, docs/spec.md section 5). The frozen parameters are passed to the
jitted step as a separate, never-donated argument and never enter the optimizer.

Optimizer (docs/spec.md section 5): AdamW (``b1 = 0.9``, ``b2 = 0.999``, ``eps = 1e-8``, weight decay 0.01)
through ``optax.multi_transform`` with two learning rates, adapter (or base) leaves at ``lr`` and the
head at ``head_lr``, each on a linear warm-up over ``warmup_ratio`` of the steps followed by a linear
decay to 0 (as ``transformers.get_linear_schedule_with_warmup``). Biases and LayerNorm scales are not
decayed; adapter leaves are.

Forward: the activation path by default, ``model.apply(frozen + head, dense_fn=adapted_dense(adapter,
dropout_rng))``; ``path="weight"`` forms ``apply_adapter(params, adapter)`` and runs the plain model.
Loss: cross-entropy, or squared error for regression (``num_labels == 1``), averaged with the batch's
``weights`` (0 for padding rows). Gradient accumulation splits a batch ``(B, ...)`` into ``grad_accum``
micro-batches ``(B / grad_accum, ...)`` scanned inside one jitted step; the summed weighted gradient is
divided by the summed weight, so the update equals the one of the whole batch.

Layers: :func:`make_train_step` gives the run as pure functions (:class:`TrainStep`: initial state,
step, evaluation; jit them, or lower them ahead of time, with no class around them); :class:`Trainer`
binds them to one model's parameters and a mesh (the split into frozen and head, placement, one jitted
step, host batches to the device); :func:`fit` is the loop over ``Trainer.train_step`` (epochs,
checkpoints, resume, NaN handling, step timing).

Usage::

    trainer = Trainer(model.apply, model.params, num_labels=2, total_steps=300,
                      adapter_config=AdapterConfig(method="sora", r=16, target_modules=[...],
                                                   modules_to_save=["classifier"]),
                      config=TrainConfig(lr=5e-4, head_lr=1e-3))
    state = trainer.init_state(seed=0)
    result = fit(trainer, state, train_batches=lambda epoch: batches[epoch], epochs=3,
                 evaluate=lambda s: {"accuracy": ...}, checkpointer=Checkpointer(...))
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sora_jax.adapter import Adapter, apply_adapter, init_adapter, path_str, saved_leaves
from sora_jax.config import AdapterConfig
from sora_jax.dense import adapted_dense

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Any]

PATHS = ("activation", "weight")
# batch keys that are targets, not model inputs
TARGET_KEYS = ("labels", "weights")
# batch keys that never go to the device (bookkeeping, e.g. the example index of each row)
HOST_KEYS = ("index",)


class NonFiniteLossError(FloatingPointError):
    """The training loss (or the trained state) became NaN or infinite; training stopped before saving the
    bad state: every checkpoint holds finite numbers."""


@jax.jit
def _all_finite(tree: PyTree) -> Array:
    """Whether every floating-point leaf of ``tree`` is finite (a scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (docs/spec.md section 5 defaults).

    Attributes:
      lr: peak learning rate of the adapter leaves (of every base parameter with ``full``).
      head_lr: peak learning rate of the head (``modules_to_save``); ``None``: ``lr``.
      weight_decay, b1, b2, eps: AdamW.
      warmup_ratio: fraction of the optimizer steps with a linear warm-up from 0.
      grad_accum: micro-batches per optimizer step (the batch size must be a multiple).
      path: ``"activation"`` (adapter on activations) or ``"weight"`` (``apply_adapter`` first).
      dropout: run the model's own dropout while training (``deterministic=False``).
      max_grad_norm: clip the global gradient norm to this (``None``: no clipping).
      fused: activation path only: form each layer's effective weight once per step
        (:func:`sora_jax.adapted_dense`); ``False`` keeps every adapter term on activations; ``None`` (the
        default) chooses per layer by shape (:func:`sora_jax.dense.fuse_pays`).
    """

    lr: float = 5e-4
    head_lr: float | None = None
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_ratio: float = 0.06
    grad_accum: int = 1
    path: str = "activation"
    dropout: bool = True
    max_grad_norm: float | None = None
    fused: bool | None = None

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("lr", "head_lr", "max_grad_norm"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v}")
        for name in ("weight_decay", "eps"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrainState(NamedTuple):
    """``step`` (int32 scalar, optimizer steps done), ``trainable``, ``opt_state`` and ``rng``
    (raw ``uint32`` key data, so that checkpoints hold plain arrays)."""

    step: Array
    trainable: dict[str, Any]
    opt_state: Any
    rng: Array


# -- splitting the parameters ----------------------------------------------------------------------
def split_trainable(params: Mapping[str, Any], modules_to_save: Any) -> tuple[dict, dict]:
    """``(frozen, head)``: ``params`` (a nested dict) split by ``modules_to_save`` (names or a regex,
    matched like :class:`AdapterConfig` ``modules_to_save``). Both keep the original nesting."""
    config = AdapterConfig(modules_to_save=modules_to_save)
    head_paths = {p for p, _ in saved_leaves(params, config)}
    frozen: dict = {}
    head: dict = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = path_str(keypath)
        target = head if "/".join(parts) in head_paths else frozen
        node = target
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = leaf
    return frozen, head


def combine(*trees: Mapping[str, Any]) -> dict:
    """Deep union of nested dicts with disjoint leaves (``combine(frozen, head)`` = the full params)."""
    out: dict = {}
    for tree in trees:
        for k, v in tree.items():
            if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
                out[k] = combine(out[k], v)
            elif k in out:
                raise ValueError(f"combine: key {k!r} is present in two trees (expected disjoint leaves)")
            else:
                out[k] = dict(v) if isinstance(v, Mapping) else v
    return out


# -- optimizer ---------------------------------------------------------------------------------------
def lr_schedule(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warm-up over ``ceil(warmup_ratio * total_steps)`` steps, then linear decay to 0 at
    ``total_steps`` (``transformers.get_linear_schedule_with_warmup``)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if warmup == 0:
        return optax.linear_schedule(peak, 0.0, max(total_steps, 1))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))],
        [warmup],
    )


def _decay_mask(tree: PyTree) -> PyTree:
    """``True`` for leaves AdamW decays: everything but ``bias`` and LayerNorm ``scale`` leaves."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: path_str(kp)[-1] not in ("bias", "scale"), tree)


def _group_labels(trainable: PyTree) -> PyTree:
    """``"head"`` for the leaves under ``trainable["head"]``, ``"body"`` for the rest (one label per leaf;
    a tree that is one leaf, such as the stand-in ``optax.tree_map_params`` passes, is ``"body"``)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: "head" if path_str(kp)[:1] == ("head",) else "body", trainable
    )


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with two learning-rate schedules: ``trainable["head"]`` at ``head_lr``, the rest at ``lr``."""

    def adamw(peak: float) -> optax.GradientTransformation:
        return optax.adamw(
            lr_schedule(peak, total_steps, config.warmup_ratio),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=_decay_mask,
        )

    head_lr = config.lr if config.head_lr is None else config.head_lr
    tx = optax.multi_transform({"body": adamw(config.lr), "head": adamw(head_lr)}, _group_labels)
    # the same state structure with and without clipping, so that a run can resume with a clip added
    clip = optax.identity() if config.max_grad_norm is None else optax.clip_by_global_norm(config.max_grad_norm)
    return optax.chain(clip, tx)


# -- loss --------------------------------------------------------------------------------------------
def loss_sums(logits: Array, labels: Array, weights: Array) -> tuple[Array, Array]:
    """``(sum_i w_i l_i, sum_i w_i)``: cross-entropy for ``logits: (B, C)``, ``C >= 2``, integer
    ``labels: (B,)``; squared error for ``C == 1`` (regression, float labels). Rows with ``w == 0``
    contribute exactly 0 (even a NaN label in a padding row)."""
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] == 1:
        per = jnp.square(logits[:, 0] - labels.astype(jnp.float32))
    else:
        per = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
    w = weights.astype(jnp.float32)
    return jnp.sum(jnp.where(w > 0, per * w, 0.0)), jnp.sum(w)


def model_inputs(batch: Batch) -> dict[str, Any]:
    """The batch without its targets (``labels``, ``weights``) and host-side keys (``index``)."""
    return {k: v for k, v in batch.items() if k not in TARGET_KEYS and k not in HOST_KEYS}


def step_time_stats(times: Sequence[float], compile_times: Sequence[float] = ()) -> dict[str, float]:
    """Median, p10, p90, mean (seconds) of steady-state step times, and the compile time (first call
    per batch shape, compile included)."""
    t = np.asarray(times, np.float64)
    stats = {"n": int(t.size), "compile_s": float(np.sum(compile_times)), "compiles": len(compile_times)}
    if t.size:
        stats.update(
            median_s=float(np.median(t)),
            p10_s=float(np.percentile(t, 10)),
            p90_s=float(np.percentile(t, 90)),
            mean_s=float(t.mean()),
        )
    return stats


# -- the step as pure functions ------------------------------------------------------------------------
def forward(
    apply_fn: Callable[..., dict[str, Array]],
    trainable: dict,
    frozen: dict,
    inputs: dict,
    rng: Array | None,
    config: TrainConfig,
) -> tuple[dict, dict]:
    """``(the model's output dict, the parameters it ran with)`` for one batch of model ``inputs``.

    ``trainable`` is ``{"base", "head"}`` (full fine-tuning: the model runs with ``base + head``) or
    ``{"adapter", "head"}`` (the model runs with ``frozen + head``, the adapter on its activations through
    :func:`sora_jax.adapted_dense`, or on its weights with ``config.path == "weight"``). ``rng`` (a key):
    training, with the model's dropout when ``config.dropout`` and the adapter's own; ``None``: evaluation.
    """
    train = rng is not None and config.dropout
    kwargs: dict[str, Any] = {"deterministic": not train}
    if train:
        kwargs["rngs"] = {"dropout": jax.random.fold_in(rng, 0)}
    if "base" in trainable:
        params = combine(trainable["base"], trainable["head"])
        return apply_fn(params, **kwargs, **inputs), params
    adapter = trainable["adapter"]
    params = combine(frozen, trainable["head"])
    if config.path == "weight":
        params = apply_adapter(params, adapter)
        return apply_fn(params, **kwargs, **inputs), params
    lora_rng = None if rng is None else jax.random.fold_in(rng, 1)
    dense_fn = adapted_dense(adapter, lora_rng, fused=config.fused)
    return apply_fn(params, dense_fn=dense_fn, **kwargs, **inputs), params


def accumulated_grads(
    loss_fn: Callable[[dict, Batch, Array], tuple[Array, Array]], trainable: dict, batch: Batch, key: Array, accum: int
) -> tuple[Array, Array, dict]:
    """``(sum of weighted losses, sum of weights, gradient of the first)`` of ``loss_fn(trainable, batch,
    key) -> (lsum, wsum)`` over ``batch (B, ...)``; with ``accum > 1`` as ``accum`` micro-batches
    ``(B / accum, ...)`` scanned in order, micro-batch ``i`` with key ``fold_in(key, i)``."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (lsum, wsum), gsum = grad_fn(trainable, batch, key)
        return lsum, wsum, gsum
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), dict(batch))

    def body(carry, xs):
        g_acc, l_acc, w_acc = carry
        mb, i = xs
        (l, w), g = grad_fn(trainable, mb, jax.random.fold_in(key, i))
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, w_acc + w), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (gsum, lsum, wsum), _ = jax.lax.scan(body, init, (micro, jnp.arange(accum)))
    return lsum, wsum, gsum


class TrainStep(NamedTuple):
    """One training setup as pure functions (optax style): they hold no state and each can be jitted.

    Attributes:
      init_trainable: ``init_trainable(key, frozen, head) -> trainable``: with an adapter ``{"adapter":
        init_adapter(fold_in(key, 0), frozen, config), "head": head}``, with full fine-tuning ``{"base":
        frozen, "head": head}``; every leaf a fresh buffer (the state is donated to the step).
      init: ``init(trainable, key) -> TrainState`` at step 0, the optimizer state of ``trainable``
        (placed like it), the dropout key ``fold_in(key, 1)``.
      step: ``step(state, frozen, batch) -> (state, loss)``: one optimizer step over ``batch`` (model
        inputs, ``labels``, ``weights``; host-only keys removed), ``loss`` the batch's weighted mean.
      eval: ``eval(trainable, frozen, batch) -> logits (B, num_labels)`` without dropout.
      tx: the optimizer (:func:`make_optimizer`).
    """

    init_trainable: Callable[[Array, dict, dict], dict]
    init: Callable[[dict, Array], TrainState]
    step: Callable[[TrainState, dict, Batch], tuple[TrainState, Array]]
    eval: Callable[[dict, dict, Batch], Array]
    tx: optax.GradientTransformation


def make_train_step(
    apply_fn: Callable[..., dict[str, Array]],
    *,
    total_steps: int,
    adapter_config: AdapterConfig | None = None,
    config: TrainConfig = TrainConfig(),
    loss_fn: Callable[[dict[str, Array], Batch, dict], tuple[Array, Array]] | None = None,
) -> TrainStep:
    """The pure functions of training ``apply_fn``'s model with ``adapter_config`` (``None``: every
    parameter), see :class:`TrainStep` and :class:`Trainer` for the arguments.

    Usage without :class:`Trainer`::

        frozen, head = split_trainable(params, ["classifier"])
        ts = make_train_step(model.apply, total_steps=100, adapter_config=config)
        key = jax.random.key(0)
        state = ts.init(ts.init_trainable(key, frozen, head), key)
        step = jax.jit(ts.step, donate_argnums=0)
        state, loss = step(state, frozen, model_inputs_and_targets)
    """
    tx = make_optimizer(config, total_steps)
    full = adapter_config is None

    def init_trainable(key: Array, frozen: dict, head: dict) -> dict:
        head = jax.tree.map(jnp.array, head)
        if full:
            trainable = {"base": frozen, "head": head}
        else:
            trainable = {"adapter": init_adapter(jax.random.fold_in(key, 0), frozen, adapter_config), "head": head}
        # every leaf its own buffer (the state is donated; init_adapter's D may share C's buffer)
        return jax.tree.map(lambda x: jnp.array(x, copy=True), trainable)

    def init(trainable: dict, key: Array) -> TrainState:
        rng = jax.random.key_data(jax.random.fold_in(key, 1))
        return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), rng)

    def loss(trainable: dict, frozen: dict, batch: Batch, rng: Array) -> tuple[Array, Array]:
        out, params = forward(apply_fn, trainable, frozen, model_inputs(batch), rng, config)
        if loss_fn is not None:
            return loss_fn(out, batch, params)
        return loss_sums(out["logits"], batch["labels"], batch["weights"])

    # the functions' names name their jitted programs and so the persistent compilation cache's entries
    # (``jit__train_step-...``): kept as they were when these were Trainer methods
    def _train_step(state: TrainState, frozen: dict, batch: Batch) -> tuple[TrainState, Array]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        lsum, wsum, gsum = accumulated_grads(
            lambda t, b, k: loss(t, frozen, b, k), state.trainable, batch, key, config.grad_accum
        )
        denom = jnp.maximum(wsum, 1e-12)
        grads = jax.tree.map(lambda g: g / denom, gsum)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return TrainState(state.step + 1, trainable, opt_state, state.rng), lsum / denom

    def _logits(trainable: dict, frozen: dict, batch: Batch) -> Array:
        return forward(apply_fn, trainable, frozen, model_inputs(batch), None, config)[0]["logits"]

    return TrainStep(init_trainable, init, _train_step, _logits, tx)


# -- placement on a mesh -----------------------------------------------------------------------------------
def trainable_shardings(trainable: dict[str, Any], frozen: dict, mesh: Any, *, shard_adapter: bool = True) -> dict:
    """A ``NamedSharding`` per leaf of ``trainable``: the head and a full fine-tuning base as
    :func:`sora_jax.sharding.param_shardings`, the adapter with its base kernels in ``frozen``
    (:func:`sora_jax.sharding.adapter_shardings`; ``shard_adapter=False``: replicated)."""
    from sora_jax import sharding

    out = {"head": sharding.param_shardings(trainable["head"], mesh)}
    if "base" in trainable:
        out["base"] = sharding.param_shardings(trainable["base"], mesh)
    else:
        out["adapter"] = sharding.adapter_shardings(trainable["adapter"], frozen, mesh, shard=shard_adapter)
    return out


def state_shardings(tx: optax.GradientTransformation, state: TrainState, train_sh: dict, mesh: Any) -> TrainState:
    """Shardings of a whole state: the trainable leaves as ``train_sh``, every copy of the parameter tree
    in the optimizer state (Adam's moments) like the parameters (``optax.tree_map_params``), the rest
    (counts, step, key) replicated."""
    from sora_jax import sharding

    rep = sharding.replicated(mesh)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    opt_sh = optax.tree_map_params(
        tx,
        lambda leaf, sh: leaf if masked(leaf) else sh,  # multi_transform holds a MaskedNode for the other group
        state.opt_state,
        train_sh,
        transform_non_params=lambda _: rep,
        is_leaf=masked,
    )
    return TrainState(rep, train_sh, opt_sh, rep)


# -- the trainer ---------------------------------------------------------------------------------------
class Trainer:
    """The functions of :func:`make_train_step` bound to one model, its parameters and a mesh: splits the
    parameters, places them, jits the step once (state donated) and moves host batches to the device.

    Args:
      apply_fn: ``apply_fn(params, *, dense_fn=None, deterministic=True, rngs=None, **inputs) ->
        {"logits": (B, num_labels), ...}`` (``sora_jax.PretrainedModel.apply``).
      params: the pretrained parameters (nested dict), head included.
      num_labels: logits per example (1: regression).
      total_steps: optimizer steps of the whole run (for the learning-rate schedule).
      adapter_config: the adapter; ``None`` trains every parameter (full fine-tuning).
      modules_to_save: the head for full fine-tuning (with an adapter: ``adapter_config.modules_to_save``).
      config: :class:`TrainConfig`.
      mesh: a ``jax.sharding.Mesh`` (see :mod:`sora_jax.sharding`); ``None``: default device.
      shard_adapter: shard adapter factors with their base kernel (else replicate them).
      loss_fn: ``loss_fn(outputs, batch, params) -> (sum of weighted losses, sum of weights)`` in place of
        :func:`loss_sums` of ``outputs["logits"]`` (``outputs``: the model's whole output dict; ``params``:
        the frozen + head parameters the model ran with), e.g. a causal-LM loss over tokens
        (:func:`sora_jax.lm.causal_lm_loss`).
    """

    def __init__(
        self,
        apply_fn: Callable[..., dict[str, Array]],
        params: Mapping[str, Any],
        *,
        num_labels: int,
        total_steps: int,
        adapter_config: AdapterConfig | None = None,
        modules_to_save: Any = ("classifier",),
        config: TrainConfig = TrainConfig(),
        mesh: Any = None,
        shard_adapter: bool = True,
        loss_fn: Callable[[dict[str, Array], Batch, dict], tuple[Array, Array]] | None = None,
    ):
        self.apply_fn = apply_fn
        self.loss_fn = loss_fn
        self.num_labels = num_labels
        self.total_steps = total_steps
        self.adapter_config = adapter_config
        self.config = config
        self.mesh = mesh
        self.shard_adapter = shard_adapter
        save = adapter_config.modules_to_save if adapter_config is not None else modules_to_save
        frozen, head = split_trainable(params, save)
        self._head = head
        # full fine-tuning: nothing is frozen, the base parameters only seed the trainable state
        self._base = frozen if self.full else None
        self.frozen = {} if self.full else frozen
        self.fns = make_train_step(
            apply_fn, total_steps=total_steps, adapter_config=adapter_config, config=config, loss_fn=loss_fn
        )
        self.tx = self.fns.tx
        if mesh is not None and not self.full:
            from sora_jax import sharding

            self.frozen = jax.device_put(frozen, sharding.param_shardings(frozen, mesh))
        self._train_fn: Callable | None = None
        self._eval_fn = jax.jit(self.fns.eval)

    @property
    def full(self) -> bool:
        return self.adapter_config is None

    # -- state -------------------------------------------------------------------------------
    def init_state(self, seed: int = 0) -> TrainState:
        """A fresh state: adapter from ``init_adapter(fold_in(key(seed), 0))``, dropout key
        ``fold_in(key(seed), 1)``, the head copied from the pretrained parameters."""
        key = jax.random.key(seed)
        trainable = self.fns.init_trainable(key, self._base if self.full else self.frozen, self._head)
        if self.mesh is not None:
            trainable = jax.device_put(trainable, self.trainable_shardings(trainable))
        state = self.fns.init(trainable, key)
        if self.mesh is not None:
            state = jax.device_put(state, self.state_shardings(state))
        return state

    def trainable_shardings(self, trainable: dict[str, Any]) -> dict[str, Any]:
        """:func:`trainable_shardings` on this trainer's mesh."""
        return trainable_shardings(trainable, self.frozen, self.mesh, shard_adapter=self.shard_adapter)

    def state_shardings(self, state: TrainState) -> TrainState:
        """:func:`state_shardings` on this trainer's mesh."""
        return state_shardings(self.tx, state, self.trainable_shardings(state.trainable), self.mesh)

    def params(self, state: TrainState) -> dict:
        """The model parameters for export: frozen + trained head (+ trained base with ``full``)."""
        if self.full:
            return combine(state.trainable["base"], state.trainable["head"])
        return combine(self.frozen, state.trainable["head"])

    def adapter(self, state: TrainState) -> Adapter | None:
        return None if self.full else state.trainable["adapter"]

    # -- steps -----------------------------------------------------------------------------------
    def jitted_train_step(self, state: TrainState) -> Callable:
        """The jitted ``step(state, frozen, device_batch) -> (state, loss)`` (``state`` donated), for
        ahead-of-time lowering (``.lower(...).compile()``) and benchmarks; :meth:`train_step` calls it."""
        if self._train_fn is None:
            kwargs: dict[str, Any] = {"donate_argnums": (0,)}
            if self.mesh is not None:
                from sora_jax import sharding

                kwargs["out_shardings"] = (self.state_shardings(state), sharding.replicated(self.mesh))
            self._train_fn = jax.jit(self.fns.step, **kwargs)
        return self._train_fn

    def put_batch(self, batch: Batch) -> dict[str, Any]:
        """The batch as device arrays (split along the mesh's ``data`` axis when there is a mesh)."""
        batch = {k: v for k, v in batch.items() if k not in HOST_KEYS}
        n = len(next(iter(batch.values())))
        if n % self.config.grad_accum:
            raise ValueError(
                f"batch size {n} is not a multiple of grad_accum={self.config.grad_accum}; "
                f"choose a batch size divisible by it"
            )
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        from sora_jax import sharding

        return sharding.shard_batch(batch, self.mesh, multiple=self.config.grad_accum)

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Array]:
        """One optimizer step; ``state`` is donated (do not use it afterwards). Returns the new
        state and the batch's weighted mean loss (a device scalar)."""
        return self.jitted_train_step(state)(state, self.frozen, self.put_batch(batch))

    def predict(self, state: TrainState, batch: Batch) -> np.ndarray:
        """Logits ``(B, num_labels)`` (NumPy) of one batch, no dropout."""
        return np.asarray(self._eval_fn(state.trainable, self.frozen, self.put_batch(batch)))

    def count_parameters(self, state: TrainState) -> dict[str, float]:
        """``trainable``, ``total``, ``percent`` (as PEFT's ``print_trainable_parameters``)."""
        if self.full:
            n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.trainable))
            return {"trainable": n, "total": n, "percent": 100.0}
        from sora_jax.adapter import trainable_parameters

        return trainable_parameters(self.params(state), state.trainable["adapter"])


# -- the loop --------------------------------------------------------------------------------------
@dataclasses.dataclass
class StepInfo:
    """What ``on_step`` receives after every optimizer step."""

    step: int
    epoch: int
    batch_index: int
    batches_in_epoch: int
    loss: float
    seconds: float
    examples: int


@dataclasses.dataclass
class FitResult:
    """``state``; ``history`` (one dict per finished epoch: ``epoch``, ``train_loss`` and the
    evaluation metrics); steady-state ``step_times`` and ``compile_times`` (s) of this process;
    ``step``: optimizer steps done; ``finished``: all epochs ran (``False`` after ``max_steps``)."""

    state: TrainState
    history: list[dict[str, Any]]
    step_times: list[float]
    compile_times: list[float]
    step: int
    finished: bool
    resumed_from: int | None = None

    def timing(self) -> dict[str, float]:
        return step_time_stats(self.step_times, self.compile_times)


def _shape_key(batch: Batch) -> tuple:
    return tuple(sorted((k, tuple(np.shape(v))) for k, v in batch.items()))


def fit(
    trainer: Trainer,
    state: TrainState,
    *,
    train_batches: Callable[[int], Sequence[Batch]],
    epochs: int,
    evaluate: Callable[[TrainState], dict[str, Any]] | None = None,
    checkpointer: Any = None,
    save_every: int = 0,
    resume: bool = False,
    max_steps: int | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> FitResult:
    """Train for ``epochs`` epochs (``train_batches(epoch)`` gives an epoch's batches, deterministic
    per epoch), evaluating after each and checkpointing every ``save_every`` steps and at each
    epoch end (when a :class:`sora_jax.checkpoint.Checkpointer` is given).

    ``resume=True`` restores the checkpointer's latest checkpoint (state, data position, history)
    and continues; the run then ends with the same parameters and metrics as an uninterrupted one.
    ``max_steps`` stops after that many optimizer steps in all (as if the process were killed).
    ``on_step(StepInfo)`` runs after every step, ``on_epoch(history)`` after each epoch's evaluation
    (``history[-1]`` is the new record).

    Raises:
      NonFiniteLossError: a NaN/inf loss; the checkpoints written so far are kept as they are.
    """
    epoch, start_index, history = 0, 0, []
    loss_sum, loss_count = 0.0, 0
    resumed_from = None
    if resume and checkpointer is not None and checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        epoch, start_index, history = meta["epoch"], meta["batch_index"], list(meta["history"])
        loss_sum, loss_count = meta["epoch_loss_sum"], meta["epoch_loss_count"]
        resumed_from = int(meta["step"])
    step = int(state.step)
    seen: set[tuple] = set()
    step_times: list[float] = []
    compile_times: list[float] = []

    def newest() -> str:
        if checkpointer is None:
            return ""
        checkpointer.wait()
        last = checkpointer.latest_step()
        if last is None:
            return "; no checkpoint was written before it"
        return f"; the last good checkpoint (step {last}) in {checkpointer.directory} holds finite numbers and is kept"

    def advice() -> str:
        return (
            ". Lower the learning rate or clip the gradient norm, and resume from the checkpoint (glue.py: "
            "--resume with a lower --lr, or with --max-grad-norm 1.0; an optimizer-settings change that "
            "run_config.json records) or restart"
        )

    def save(next_epoch: int, next_index: int) -> None:
        if checkpointer is None:
            return
        if not bool(_all_finite((state.trainable, state.opt_state))):
            raise NonFiniteLossError(
                f"the trained state holds NaN/inf values after step {step} (epoch {epoch + 1}; its loss was "
                f"finite), so it is not saved{newest()}{advice()}"
            )
        meta = {
            "step": step,
            "epoch": next_epoch,
            "batch_index": next_index,
            "history": history,
            "epoch_loss_sum": loss_sum,
            "epoch_loss_count": loss_count,
        }
        checkpointer.save(step, state, meta)

    while epoch < epochs:
        batches = train_batches(epoch)
        for i in range(start_index, len(batches)):
            batch = batches[i]
            t0 = time.perf_counter()
            state, loss_dev = trainer.train_step(state, batch)
            loss = float(jax.block_until_ready(loss_dev))
            dt = time.perf_counter() - t0
            key = _shape_key(batch)
            (step_times if key in seen else compile_times).append(dt)
            seen.add(key)
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"training loss is {loss} at step {step + 1} (epoch {epoch + 1}, batch {i + 1}/{len(batches)})"
                    f"{newest()}{advice()}"
                )
            step += 1
            loss_sum += loss
            loss_count += 1
            if on_step is not None:
                n = int(np.sum(np.asarray(batch["weights"]) > 0))
                on_step(StepInfo(step, epoch, i, len(batches), loss, dt, n))
            if save_every and step % save_every == 0 and i + 1 < len(batches):
                save(epoch, i + 1)
            if max_steps is not None and step >= max_steps:
                if checkpointer is not None:
                    checkpointer.wait()
                return FitResult(state, history, step_times, compile_times, step, False, resumed_from)
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(loss_count, 1)}
        if evaluate is not None:
            record.update(evaluate(state))
        history.append(record)
        if on_epoch is not None:
            on_epoch(history)
        epoch, start_index, loss_sum, loss_count = epoch + 1, 0, 0.0, 0
        save(epoch, 0)
    if checkpointer is not None:
        checkpointer.wait()
    return FitResult(state, history, step_times, compile_times, step, True, resumed_from)
