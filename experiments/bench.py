"""Side-by-side training and inference benchmark of sora-jax (and, with ``--peft``, its PyTorch peer).

One process, one table. For a model, a batch and a sequence length it measures:

- the **frozen-backprop** reference: the frozen model's forward plus the backward pass that carries the
  gradient down through every layer to the embedding output (input gradients only, no weight
  gradients), the floor of every adapter method;
- full fine-tuning (every parameter, AdamW);
- each method (lora, dora, prediag, sora, pre_ortho, post_ortho) through each execution path:
  ``activation`` (``sora_jax.adapted_dense(adapter)`` as the model's ``dense_fn``) and ``weight``
  (``sora_jax.apply_adapter`` then the plain model), each a jitted train step (value_and_grad + AdamW,
  state donated) of :class:`sora_jax.train.Trainer`;
- inference: the frozen model, each method unmerged (activation and weight path) and merged
  (``sora_jax.merge`` then the plain model);
- with ``--dropout``: every train step (both frameworks) with the model's dropout, as ``glue.py`` trains;
  ``--jax-masks`` adds each JAX step with ``jax.random.bernoulli``'s masks (the same masks, JAX's own
  lowering of the hash);
- the machine's matmul ceiling (``jnp.dot`` of 2048^3 and 4096x384x1536, and ``torch.mm`` with ``--peft``);
- with ``--peft``: ``transformers`` + PEFT LoRA and DoRA, a PyTorch Pre-Diag/SORA wrapper around
  ``nn.Linear`` (docs/spec.md section 2, activation form) and the same frozen-backprop reference in torch,
  on the same weights, batch and thread count.

All variants are compiled first, then measured in rounds that alternate every variant (JAX and torch
interleaved) so that machine drift hits all of them alike. Times are wall-clock per step after
``block_until_ready``; medians with p10/p90. Memory: the XLA compiled memory analysis
(``argument + output - alias + temp`` bytes of the step's executable: the peak the executable can
hold, frozen weights included); torch has no such analysis on CPU (``null``).

Usage::

    python experiments/bench.py                         # minilm, 32 x 128, JAX only
    python experiments/bench.py --peft                  # + PyTorch/PEFT peer
    python experiments/bench.py --synthetic deberta-base --layers 2 --batch 8
    python experiments/bench.py --model /path/to/hf_dir --quick
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sora_jax as sj
from experiments import common
from experiments.common import ROOT
from sora_jax.adapter import find_modules
from sora_jax.config import PAPER_TARGETS
from sora_jax.train import TrainConfig, Trainer, loss_sums

METHODS = sj.METHODS
# "activation": adapted_dense's default (W' formed where that pays, fuse_pays); "unfused": every adapter term
# on activations (adapted_dense(..., fused=False))
PATHS = ("activation", "unfused", "weight")
HEADS = {"bert": ("classifier",), "roberta": ("classifier",), "xlm-roberta": ("classifier",),
         "deberta-v2": ("classifier",), "llama": ("score",)}
# Where the embedding output is, per family (the frozen-backprop gradient is taken there).
EMBEDDING_MODULE = {"bert": "embeddings", "roberta": "embeddings", "xlm-roberta": "embeddings",
                    "deberta-v2": "embeddings", "llama": "embed_tokens", "gemma": "embed_tokens",
                    "gemma2": "embed_tokens", "gemma3_text": "embed_tokens"}
# torch methods and the sora-jax method each one is compared with
TORCH_METHODS = {"peft_lora": "lora", "peft_dora": "dora", "torch_prediag": "prediag", "torch_sora": "sora"}


# -- configuration ---------------------------------------------------------------------------------
def synthetic_config(name: str, layers: int | None) -> Any:
    """A ``transformers`` config of a known model size, for random-weight benchmarks.

    ``deberta-base``: DeBERTa-v3-base (12 x 768, FFN 3072, vocab 128100, relative attention span 256).
    ``llama-1b``: Llama-3.2-1B (16 x 2048, FFN 8192, 32 heads / 8 KV heads, vocab 128256, tied).
    ``layers`` overrides the number of layers (for smoke tests).
    """
    import transformers

    if name == "deberta-base":
        cfg = transformers.DebertaV2Config(
            vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=512, relative_attention=True, position_buckets=256,
            norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"], layer_norm_eps=1e-7,
            max_relative_positions=-1, position_biased_input=False, type_vocab_size=0, num_labels=2,
        )
    elif name == "llama-1b":
        cfg = transformers.LlamaConfig(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
            rms_norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=0, num_labels=2,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                             "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192},
        )
    else:
        raise ValueError(f"unknown --synthetic {name!r}; choose deberta-base or llama-1b")
    if layers is not None:
        cfg.num_hidden_layers = layers
    return cfg


def save_random_model(cfg: Any, directory: Path, seed: int = 0, auto_class: str = "AutoModelForSequenceClassification"
                      ) -> Path:
    """A randomly initialised ``transformers`` model (``auto_class``: a sequence classifier by default) for
    ``cfg``, saved to ``directory``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, auto_class).from_config(cfg)
    model.save_pretrained(str(directory))
    del model
    return directory


@dataclasses.dataclass
class Setup:
    """What every variant shares: the loaded model, its directory, the batch and the adapter settings."""

    name: str
    model: Any  # sora_jax.PretrainedModel
    model_dir: Path
    model_type: str
    batch: dict[str, np.ndarray]
    targets: tuple[str, ...]
    heads: tuple[str, ...]
    r: int
    alpha: float
    r_p: int
    # a causal LM: ``Trainer`` ``loss_fn`` over tokens from ``last_hidden_state`` (the model run with
    # ``return_logits=False``); None: classification (``loss_sums`` of the logits)
    loss_fn: Callable[..., tuple[jax.Array, jax.Array]] | None = None

    def apply_fn(self) -> Callable[..., dict[str, jax.Array]]:
        """The model's forward as the step runs it (no ``(B, T, vocab)`` logits for a causal LM)."""
        if self.loss_fn is None:
            return self.model.apply
        return lambda params, **kw: self.model.apply(params, return_logits=False, **kw)

    def loss(self, params: dict, batch: dict, **apply_kwargs: Any) -> jax.Array:
        """The mean loss of ``batch`` (classification or token cross-entropy)."""
        out = self.apply_fn()(params, **inputs_of(batch), **apply_kwargs)
        if self.loss_fn is None:
            lsum, wsum = loss_sums(out["logits"], batch["labels"], batch["weights"])
        else:
            lsum, wsum = self.loss_fn(out, batch, params)
        return lsum / wsum

    def adapter_config(self, method: str) -> sj.AdapterConfig:
        return sj.AdapterConfig(method=method, r=self.r, lora_alpha=self.alpha, rotation_rank=self.r_p,
                                target_modules=self.targets, modules_to_save=self.heads,
                                kernel_axes=self.model.kernel_axes())


def make_batch(vocab: int, batch: int, seq: int, num_labels: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids (no padding), labels and unit weights."""
    rng = np.random.default_rng(seed)
    low = min(1000, vocab // 2)
    return {
        "input_ids": rng.integers(low, vocab, (batch, seq)).astype(np.int32),
        "attention_mask": np.ones((batch, seq), np.int32),
        "labels": rng.integers(0, max(num_labels, 2), (batch,)).astype(np.int32),
        "weights": np.ones((batch,), np.float32),
    }


# -- FLOPs ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Dense:
    """One dense layer: its path, ``(d_in, d_out)``, rows per step (tokens or sequences), adapted or not."""

    path: str
    d_in: int
    d_out: int
    rows: int  # per layer; a scanned stack of L layers counts L times the rows
    adapted: bool


def dense_layers(setup: Setup) -> list[Dense]:
    """Every dense layer of the model with the rows it sees per step (heads and poolers see one row per
    sequence, the rest one per token)."""
    cfg = setup.adapter_config("lora")
    B, T = setup.batch["input_ids"].shape
    out = []
    for path, mod in sorted(find_modules(setup.model.params).items()):
        *stacked, d_in, d_out = mod.kernel.shape  # scanned layers: (L, d_in, d_out), L layers of N rows each
        per_seq = path.split("/")[0] in setup.heads or "pooler" in path.split("/")
        rows = (B if per_seq else B * T) * int(np.prod(stacked, dtype=np.int64))
        out.append(Dense(path, int(d_in), int(d_out), rows, cfg.targets(path)))
    return out


def attention_flops(setup: Setup) -> float:
    """Forward FLOPs of the attention score and value matmuls: ``4 B T^2 H`` per layer (``H`` = heads x
    head_dim). DeBERTa's disentangled terms (c2p, p2c against ``2k`` relative positions) add
    ``2 x 2 B T (2k) H`` per layer."""
    c = setup.model.config
    B, T = setup.batch["input_ids"].shape
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    H = c.num_attention_heads * head_dim
    per_layer = 4.0 * B * T * T * H
    if setup.model_type == "deberta-v2" and getattr(c, "relative_attention", False):
        span = c.position_buckets if getattr(c, "position_buckets", -1) > 0 else c.max_position_embeddings
        per_layer += 2 * 2.0 * B * T * (2 * span) * H
    return per_layer * c.num_hidden_layers


def adapter_extra_flops(layer: Dense, method: str, path: str, r: int, r_p: int, training: bool) -> float:
    """FLOPs an adapter adds to one layer's step on top of the frozen one (matmuls only)."""
    N, i, o = layer.rows, layer.d_in, layer.d_out
    rot = method in ("sora", "pre_ortho", "post_ortho")
    if path in ("activation", "unfused"):
        fwd = 2.0 * N * r * (i + o) + (8.0 * N * o * r_p if rot else 0.0)
        norm = (2.0 * r * i * o + 2.0 * r * r * (i + o)) if method == "dora" else 0.0  # once per step, no grad
        return (3.0 * fwd if training else fwd) + norm
    # weight path: form W' (A B, W R, colnorm), backprop through it, plus the full weight gradient x^T dY
    form = 2.0 * i * r * o + (8.0 * i * o * r_p if rot else 0.0) + (2.0 * i * o if method == "dora" else 0.0)
    return 3.0 * form + 2.0 * N * i * o if training else form


def flop_counts(setup: Setup) -> dict[str, float]:
    """Matmul FLOPs per step of every variant, from the model's shapes.

    Frozen-backprop: ``4 N d_in d_out`` per dense layer + 3 x the attention forward; full fine-tuning:
    ``6 N d_in d_out``; adapters add :func:`adapter_extra_flops`; inference is ``2 N d_in d_out`` + the
    attention forward.
    """
    layers = dense_layers(setup)
    att = attention_flops(setup)
    fwd = sum(2.0 * L.rows * L.d_in * L.d_out for L in layers) + att
    fb = sum(4.0 * L.rows * L.d_in * L.d_out for L in layers) + 3.0 * att
    out = {"frozen_backprop": fb, "full": fb + sum(2.0 * L.rows * L.d_in * L.d_out for L in layers),
           "infer/frozen": fwd}
    for m in METHODS:
        for p in PATHS:
            extra = sum(adapter_extra_flops(L, m, p, setup.r, setup.r_p, True) for L in layers if L.adapted)
            out[f"{m}/{p}"] = fb + extra
            out[f"infer/{m}/{p}"] = fwd + sum(
                adapter_extra_flops(L, m, p, setup.r, setup.r_p, False) for L in layers if L.adapted)
        out[f"infer/{m}/merged"] = fwd
    return out


# -- measured variants ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Variant:
    """One measured thing. ``run()`` does one step and blocks until it is done."""

    name: str  # "jax/train/lora/activation", "torch/infer/peft_lora", ...
    framework: str
    kind: str  # "train", "infer" or "matmul"
    run: Callable[[], None]
    flops: float | None = None
    compile_s: float | None = None
    lower_s: float | None = None
    memory: dict[str, int] | None = None
    xla_flops: float | None = None
    times: list[float] = dataclasses.field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        t = np.asarray(self.times, np.float64)
        out: dict[str, Any] = {"framework": self.framework, "kind": self.kind, "n": int(t.size)}
        if t.size:
            out.update(**common.step_stats(t), min_s=float(t.min()))
        out.update(flops=self.flops, xla_flops=self.xla_flops, compile_s=self.compile_s, lower_s=self.lower_s,
                   memory=self.memory)
        if self.flops and t.size:
            out["achieved_gflops"] = self.flops / float(np.median(t)) / 1e9
        return out


def memory_stats(compiled: Any) -> dict[str, int] | None:
    """The XLA compiled memory analysis: argument, output, alias and temp bytes, and their peak
    ``argument + output - alias + temp`` (what the executable can hold at once)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def matmul_ceiling(results: dict[str, dict]) -> dict[str, float | None]:
    """Per framework, the best achieved GFLOP/s of its plain matmuls (``None`` when none was timed, as with
    ``--rounds 0``)."""
    return {fw: max((s["achieved_gflops"] for s in results.values() if s["kind"] == "matmul"
                     and s["framework"] == fw and s.get("achieved_gflops")), default=None) for fw in ("jax", "torch")}


def xla_flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def compile_jax(name: str, kind: str, jitted: Any, args: tuple, make_run: Callable[[Any], Callable[[], None]],
                flops: float | None) -> Variant:
    """Lower and compile ``jitted(*args)`` ahead of time (timed) and wrap the executable in a variant."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return Variant(name, "jax", kind, make_run(compiled), flops=flops, compile_s=t2 - t1, lower_s=t1 - t0,
                   memory=memory_stats(compiled), xla_flops=xla_flops(compiled))


def inputs_of(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


@contextlib.contextmanager
def jax_masks() -> Iterator[None]:
    """While tracing: dropout masks from ``jax.random.bernoulli`` itself (JAX's own Threefry lowering, a
    rolled loop on the CPU), as before PERF.md change 26; the masks are the same, the program is not."""
    from sora_jax import dropout

    saved, dropout.bernoulli = dropout.bernoulli, jax.random.bernoulli
    try:
        yield
    finally:
        dropout.bernoulli = saved


def jax_train_variant(setup: Setup, method: str | None, path: str, flops: float | None, *, dropout: bool = False,
                      with_jax_masks: bool = False) -> Variant:
    """A jitted train step of :class:`sora_jax.train.Trainer` (``method=None``: full fine-tuning), with the
    model's dropout when ``dropout`` (drawn by :func:`jax_masks` when ``with_jax_masks``: name ``.../jax-masks``)."""
    cfg = None if method is None else setup.adapter_config(method)
    model = setup.model
    num_labels = int(model.config.num_labels if setup.loss_fn is None else model.config.vocab_size)
    trainer = Trainer(setup.apply_fn(), model.params, num_labels=num_labels, total_steps=10**6,
                      adapter_config=cfg, modules_to_save=setup.heads, loss_fn=setup.loss_fn,
                      config=TrainConfig(lr=1e-5, path="activation" if path == "unfused" else path, dropout=dropout,
                                         fused=False if path == "unfused" else None))
    holder = {"state": trainer.init_state(0)}
    batch = trainer.put_batch(setup.batch)
    jitted = trainer.jitted_train_step(holder["state"])

    def make_run(compiled):
        def run() -> None:
            holder["state"], loss = compiled(holder["state"], trainer.frozen, batch)
            jax.block_until_ready((holder["state"], loss))
        return run

    name = "jax/train/full" if method is None else f"jax/train/{method}/{path}"
    with jax_masks() if with_jax_masks else contextlib.nullcontext():
        return compile_jax(name + ("/jax-masks" if with_jax_masks else ""), "train", jitted,
                           (holder["state"], trainer.frozen, batch), make_run, flops)


def _embedding_path(setup: Setup) -> tuple[str, ...]:
    return (setup.model.family.base_model_prefix, EMBEDDING_MODULE[setup.model_type])


def frozen_backprop_loss(setup: Setup, dropout: bool = False) -> Callable[..., jax.Array]:
    """``loss(delta, params, batch)``: the model's mean loss with ``delta (B, T, hidden)`` added to the
    embedding output (a ``flax.linen.intercept_methods`` hook); its gradient w.r.t. ``delta`` is the
    gradient at the embedding output, and no parameter gradient is computed."""
    import flax.linen as nn

    embed_path = _embedding_path(setup)

    def loss(delta: jax.Array, params: dict, batch: dict) -> jax.Array:
        def add_delta(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and tuple(context.module.path) == embed_path:
                out = out + delta.astype(out.dtype)
            return out

        kwargs = {"deterministic": False, "rngs": {"dropout": jax.random.key(0)}} if dropout else {}
        with nn.intercept_methods(add_delta):
            return setup.loss(params, batch, **kwargs)

    return loss


def jax_frozen_backprop_variant(setup: Setup, flops: float | None, dropout: bool = False) -> Variant:
    B, T = setup.batch["input_ids"].shape
    delta = jnp.zeros((B, T, setup.model.config.hidden_size), jnp.float32)
    batch = {k: jnp.asarray(v) for k, v in setup.batch.items()}
    jitted = jax.jit(jax.value_and_grad(frozen_backprop_loss(setup, dropout)))

    def make_run(compiled):
        return lambda: jax.block_until_ready(compiled(delta, setup.model.params, batch))

    return compile_jax("jax/train/frozen_backprop", "train", jitted, (delta, setup.model.params, batch),
                       make_run, flops)


def trained_looking(adapter: sj.Adapter, seed: int = 1) -> sj.Adapter:
    """The adapter with every leaf perturbed (B != 0, d != 1, C != D), as after training."""
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [x + 0.01 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, new)


def jax_infer_variants(setup: Setup, methods: list[str], paths: list[str], flops: dict[str, float]) -> list[Variant]:
    """Frozen inference, and per method: unmerged (each path) and merged (``sj.merge`` + plain model)."""
    model = setup.model
    params = model.params
    batch = {k: jnp.asarray(v) for k, v in inputs_of(setup.batch).items()}

    def plain(p, b):
        return model.apply(p, **b)["logits"]

    def activation(p, ad, b):
        return model.apply(p, dense_fn=sj.adapted_dense(ad), **b)["logits"]

    def unfused(p, ad, b):
        return model.apply(p, dense_fn=sj.adapted_dense(ad, fused=False), **b)["logits"]

    def weight(p, ad, b):
        return model.apply(sj.apply_adapter(p, ad), **b)["logits"]

    fns = {"activation": jax.jit(activation), "unfused": jax.jit(unfused), "weight": jax.jit(weight)}

    def runner(*args):
        return lambda compiled: (lambda: jax.block_until_ready(compiled(*args)))

    out = [compile_jax("jax/infer/frozen", "infer", jax.jit(plain), (params, batch), runner(params, batch),
                       flops["infer/frozen"])]
    plain_jit = jax.jit(plain)
    for m in methods:
        adapter = trained_looking(sj.init_adapter(jax.random.key(0), params, setup.adapter_config(m)))
        for p in paths:
            out.append(compile_jax(f"jax/infer/{m}/{p}", "infer", fns[p], (params, adapter, batch),
                                   runner(params, adapter, batch), flops[f"infer/{m}/{p}"]))
        merged = jax.block_until_ready(sj.merge(params, adapter))
        out.append(compile_jax(f"jax/infer/{m}/merged", "infer", plain_jit, (merged, batch), runner(merged, batch),
                               flops[f"infer/{m}/merged"]))
    return out


MATMUL_SHAPES = ((2048, 2048, 2048), (4096, 384, 1536))


def jax_matmul_variants() -> list[Variant]:
    out = []
    for m, k, n in MATMUL_SHAPES:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        out.append(compile_jax(f"jax/matmul/{m}x{k}x{n}", "matmul", jax.jit(jnp.dot), (a, b),
                               lambda c, a=a, b=b: (lambda: jax.block_until_ready(c(a, b))), 2.0 * m * k * n))
    return out


# -- the PyTorch peer ------------------------------------------------------------------------------------
def torch_reference() -> Any:
    """``tests/torch_reference.py`` (the PyTorch Pre-Diag / SORA of the parity tests, kept once there), loaded
    from this checkout by its path: ``tests`` is not an installed package."""
    import importlib.util

    path = common.ROOT / "tests" / "torch_reference.py"
    spec = importlib.util.spec_from_file_location("sora_jax_torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


class TorchPeer:
    """The PyTorch side: models built from the same directory, same batch, fixed thread count."""

    def __init__(self, setup: Setup, threads: int, dropout: bool = False):
        import torch
        import transformers

        torch.set_num_threads(threads)
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.torch = torch
        self.transformers = transformers
        self.setup = setup
        self.dropout = dropout
        b = setup.batch
        self.inputs = {k: torch.from_numpy(b[k].astype(np.int64)) for k in ("input_ids", "attention_mask")}
        self.labels = torch.from_numpy(b["labels"].astype(np.int64))

    def load(self) -> Any:
        if self.setup.loss_fn is not None:  # a causal LM
            model = self.transformers.AutoModelForCausalLM.from_pretrained(str(self.setup.model_dir),
                                                                        attn_implementation="sdpa")
        else:
            model = self.transformers.AutoModelForSequenceClassification.from_pretrained(
                str(self.setup.model_dir), num_labels=int(self.setup.model.config.num_labels),
                attn_implementation="sdpa")
        return model.train() if self.dropout else model.eval()  # dropout as the JAX side; autograd runs either way

    def adapted(self, method: str) -> Any:
        """PEFT LoRA/DoRA, or the Pre-Diag/SORA wrapper on every target; the head trained in full."""
        s = self.setup
        model = self.load()
        if method in ("peft_lora", "peft_dora"):
            import peft

            cfg = peft.LoraConfig(r=s.r, lora_alpha=s.alpha, target_modules=list(s.targets), lora_dropout=0.0,
                                  use_dora=method == "peft_dora", modules_to_save=list(s.heads) or None,
                                  task_type="SEQ_CLS" if s.loss_fn is None else "CAUSAL_LM")
            return peft.get_peft_model(model, cfg)
        conditioned_linear = torch_reference().conditioned_linear

        for p in model.parameters():
            p.requires_grad_(False)
        kind = {"torch_prediag": "prediag", "torch_sora": "sora"}[method]
        for name, mod in list(model.named_modules()):
            if isinstance(mod, self.torch.nn.Linear) and torch_matches(name, s.targets):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, child, conditioned_linear(mod, kind, s.r, s.alpha, s.r_p))
        for h in s.heads:
            for p in model.get_submodule(h).parameters():
                p.requires_grad_(True)
        return model

    def train_variant(self, method: str, flops: float | None) -> Variant:
        torch = self.torch
        model = self.adapted(method)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            logits = model(**self.inputs).logits
            torch.nn.functional.cross_entropy(logits.flatten(0, -2), self.labels.flatten()).backward()
            opt.step()

        return Variant(f"torch/train/{method}", "torch", "train", run, flops=flops)

    def frozen_backprop_variant(self, flops: float | None) -> Variant:
        """Forward + backward to the embedding output (a forward hook adds a zero ``delta`` that requires
        grad); every parameter frozen, so only input gradients are computed."""
        torch = self.torch
        model = self.load()
        for p in model.parameters():
            p.requires_grad_(False)
        base = model.get_submodule(model.base_model_prefix)
        embed = base.get_submodule(EMBEDDING_MODULE[self.setup.model_type])
        B, T = self.setup.batch["input_ids"].shape
        delta = torch.zeros(B, T, model.config.hidden_size, requires_grad=True)
        embed.register_forward_hook(lambda mod, args, out: out + delta)

        def run() -> None:
            delta.grad = None
            logits = model(**self.inputs).logits
            torch.nn.functional.cross_entropy(logits.flatten(0, -2), self.labels.flatten()).backward()

        return Variant("torch/train/frozen_backprop", "torch", "train", run, flops=flops)

    def infer_variant(self, method: str | None, flops: float | None) -> Variant:
        torch = self.torch
        model = self.load() if method is None else self.adapted(method)
        model.eval()

        def run() -> None:
            with torch.inference_mode():
                model(**self.inputs)

        return Variant(f"torch/infer/{method or 'frozen'}", "torch", "infer", run, flops=flops)

    def matmul_variants(self) -> list[Variant]:
        torch = self.torch
        out = []
        for m, k, n in MATMUL_SHAPES:
            a, b = torch.randn(m, k), torch.randn(k, n)
            out.append(Variant(f"torch/matmul/{m}x{k}x{n}", "torch", "matmul", lambda a=a, b=b: torch.mm(a, b),
                               flops=2.0 * m * k * n))
        return out


# -- running -------------------------------------------------------------------------------------------
def interleave(jax_vs: list[Variant], torch_vs: list[Variant]) -> list[Variant]:
    """Alternate JAX and torch variants (each torch variant next to its JAX counterpart where one exists)."""
    order: list[Variant] = []
    pending = list(torch_vs)
    for v in jax_vs:
        order.append(v)
        key = v.name.split("/", 1)[1]
        for t in list(pending):
            tkey = t.name.split("/", 1)[1]
            parts = tkey.split("/")
            mapped = "/".join([parts[0], TORCH_METHODS.get(parts[1], parts[1]), *parts[2:]]) if len(parts) > 1 else tkey
            if key in (mapped, mapped + "/activation"):
                order.append(t)
                pending.remove(t)
    return order + pending


def measure(variants: list[Variant], warmup: int, rounds: int, steps: int, log: Callable[[str], None]) -> None:
    """Warm each variant up, then ``rounds`` passes over all variants, ``steps`` timed steps each."""
    for v in variants:
        for _ in range(warmup):
            v.run()
    for r in range(rounds):
        t_round = time.perf_counter()
        for v in variants:
            for _ in range(steps):
                t0 = time.perf_counter()
                v.run()
                v.times.append(time.perf_counter() - t0)
        log(f"round {r + 1}/{rounds}: {time.perf_counter() - t_round:.1f} s")


def load_setup(args: argparse.Namespace, workdir: Path) -> Setup:
    if args.synthetic:
        cfg = synthetic_config(args.synthetic, args.layers)
        model_dir = save_random_model(cfg, workdir / args.synthetic)
        name = args.synthetic if args.layers is None else f"{args.synthetic}-{args.layers}l"
    else:
        model_dir = None
        name = Path(args.model).name if os.path.isdir(args.model) else args.model
    model = sj.load_pretrained(str(model_dir) if model_dir else args.model, load_tokenizer=False,
                               scan_layers=args.scan_layers)
    name += "-scan" if args.scan_layers else ""
    model_type = model.config.model_type
    if model_type not in PAPER_TARGETS:
        raise SystemExit(f"no GLUE targets known for model_type {model_type!r}; known: {sorted(PAPER_TARGETS)}")
    targets = tuple(args.targets.split(",")) if args.targets else PAPER_TARGETS[model_type]
    num_labels = int(model.config.num_labels)
    batch = make_batch(int(model.config.vocab_size), args.batch, args.seq, num_labels)
    if model_type == "llama":  # sequence classification pools the last non-pad token: keep pad out of the ids
        batch["input_ids"] = np.where(batch["input_ids"] == model.config.pad_token_id, 1, batch["input_ids"])
    return Setup(name, model, Path(model.path), model_type, batch, targets, HEADS[model_type], args.r,
                 float(args.alpha), args.r_p)


# -- report ----------------------------------------------------------------------------------------------
def run_record(args: argparse.Namespace, argv: list[str] | None, threads: int) -> dict[str, Any]:
    """What every benchmark JSON records about its run: the command, the date, versions, the device, the
    threads of XLA and (with ``--peft``) torch, and what the memory figures are."""
    torch_threads = None
    if args.peft:
        import torch

        torch_threads = {"num_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(["bench.py", *argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": common.versions(common.BENCH_PACKAGES), "device": common.machine(), "gpu": common.machine()["gpu"],
        "threads": {"cpu_count": threads, "jax_xla_flags": os.environ.get("XLA_FLAGS", ""), "torch": torch_threads},
        "memory_note": "XLA compiled memory analysis of each JAX step (argument + output - alias + temp bytes); "
                       "no torch memory figure on CPU",
    }


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or "median_s" not in a or "median_s" not in b:
        return None
    return a["median_s"] / b["median_s"]


def summarise(results: dict[str, dict], flops: dict[str, float], ceiling: dict[str, float]) -> dict[str, Any]:
    """Ratios (method / frozen-backprop, method / LoRA, sora-jax / PyTorch) and the FLOP floors."""
    out: dict[str, Any] = {}
    fb = results.get("jax/train/frozen_backprop")
    for name, st in results.items():
        fw, kind, *rest = name.split("/")
        row: dict[str, Any] = {}
        if kind == "train" and fw == "jax":
            key = "/".join(rest)
            row["vs_frozen_backprop"] = ratio(st, fb)
            row["flop_floor_vs_frozen_backprop"] = flops[key] / flops["frozen_backprop"] if key in flops else None
            if len(rest) == 2:
                lora = results.get(f"jax/train/lora/{rest[1]}")
                row["vs_lora"] = ratio(st, lora)
                row["flop_floor_vs_lora"] = flops[key] / flops[f"lora/{rest[1]}"]
            peer = {v: k for k, v in TORCH_METHODS.items()}.get(rest[0])
            if rest == ["frozen_backprop"]:
                peer = "frozen_backprop"
            if peer and (len(rest) == 1 or rest[1] == "activation"):
                row["vs_torch"] = ratio(st, results.get(f"torch/train/{peer}"))
        elif kind == "train" and fw == "torch":
            row["vs_frozen_backprop"] = ratio(st, results.get("torch/train/frozen_backprop"))
            row["vs_lora"] = ratio(st, results.get("torch/train/peft_lora"))
        elif kind == "infer":
            row["vs_frozen"] = ratio(st, results.get(f"{fw}/infer/frozen"))
            if fw == "jax" and rest != ["frozen"]:
                peer = {v: k for k, v in TORCH_METHODS.items()}.get(rest[0])
                if peer and rest[1] == "activation":
                    row["vs_torch"] = ratio(st, results.get(f"torch/infer/{peer}"))
            if fw == "jax" and rest == ["frozen"]:
                row["vs_torch"] = ratio(st, results.get("torch/infer/frozen"))
        if st.get("achieved_gflops") and ceiling.get(fw) and kind != "matmul":
            row["fraction_of_ceiling"] = st["achieved_gflops"] / ceiling[fw]
        out[name] = row
    return out


def acceptance(results: dict[str, dict], ratios: dict[str, dict]) -> list[dict[str, Any]]:
    """The performance targets (experiments/PERF.md), checked on these medians (activation path)."""
    def r(name: str, key: str) -> float | None:
        return ratios.get(name, {}).get(key)

    def mem(name: str) -> float | None:
        a, b = results.get(name, {}).get("memory"), results.get("jax/train/frozen_backprop", {}).get("memory")
        return a["peak"] / b["peak"] if a and b else None

    checks = [("LoRA / frozen-backprop", r("jax/train/lora/activation", "vs_frozen_backprop"), 1.15)]
    for m in ("dora", "prediag", "sora"):
        checks.append((f"{m} / LoRA", r(f"jax/train/{m}/activation", "vs_lora"), 1.05))
    for m in ("lora", "sora"):
        checks.append((f"sora-jax {m} / PEFT LoRA", ratio(results.get(f"jax/train/{m}/activation"),
                                                         results.get("torch/train/peft_lora")), 1.0))
    for m in METHODS:
        checks.append((f"merged {m} inference / frozen", r(f"jax/infer/{m}/merged", "vs_frozen"), 1.02))
    checks.append(("unmerged sora inference / frozen", r("jax/infer/sora/activation", "vs_frozen"), 1.05))
    for m in METHODS:
        checks.append((f"peak memory {m} / frozen-backprop", mem(f"jax/train/{m}/activation"), 1.10))
    return [{"check": c, "value": v, "target": t, "pass": None if v is None else bool(v <= t)} for c, v, t in checks]


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(results: dict[str, dict], ratios: dict[str, dict], flops: dict[str, float],
                checks: list[dict[str, Any]], out: Callable[[str], None]) -> None:
    hdr = (f"{'variant':34s} {'median s':>9s} {'p10':>7s} {'p90':>7s} {'/fb':>6s} {'floor':>6s} {'/lora':>6s} "
           f"{'floor':>6s} {'/torch':>6s} {'GF/s':>6s} {'%ceil':>6s} {'comp s':>7s} {'peak MiB':>8s}")
    for kind in ("train", "infer", "matmul"):
        out(f"\n== {kind} ==")
        out(hdr)
        for name, st in results.items():
            if st["kind"] != kind:
                continue
            rt = ratios.get(name, {})
            mem = st.get("memory")
            first = rt.get("vs_frozen_backprop", rt.get("vs_frozen"))
            out(f"{name:34s} {fmt(st.get('median_s')):>9s} {fmt(st.get('p10_s')):>7s} {fmt(st.get('p90_s')):>7s} "
                f"{fmt(first, '.2f'):>6s} {fmt(rt.get('flop_floor_vs_frozen_backprop'), '.2f'):>6s} "
                f"{fmt(rt.get('vs_lora'), '.2f'):>6s} {fmt(rt.get('flop_floor_vs_lora'), '.2f'):>6s} "
                f"{fmt(rt.get('vs_torch'), '.2f'):>6s} {fmt(st.get('achieved_gflops'), '.1f'):>6s} "
                f"{fmt(None if rt.get('fraction_of_ceiling') is None else 100 * rt['fraction_of_ceiling'], '.0f'):>6s} "
                f"{fmt(st.get('compile_s'), '.1f'):>7s} {fmt(None if not mem else mem['peak'] / 2**20, '.0f'):>8s}")
    out("\n(/fb: median / frozen-backprop median (inference: / frozen model); floor: the same ratio of matmul FLOPs;"
        " /lora: / LoRA on the same path; /torch: sora-jax / its PyTorch peer; peak MiB: XLA compiled memory"
        " analysis, argument + output - alias + temp)")
    out("\n== acceptance targets ==")
    for c in checks:
        mark = "n/a" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        out(f"{c['check']:40s} {fmt(c['value'], '.3f'):>7s} <= {c['target']:.2f}  {mark}")


def _decoder() -> Any:
    """``experiments/bench_decoder.py`` (imported when needed: it imports this module)."""
    from experiments import bench_decoder

    return bench_decoder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    bench_decoder = _decoder()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="minilm", help="alias or model directory for sora_jax.load_pretrained")
    src.add_argument("--synthetic", choices=("deberta-base", "llama-1b", *bench_decoder.SYNTHETIC),
                     help="random weights, known config (llama, gemma and their -tiny forms: causal LMs)")
    p.add_argument("--layers", type=int, default=None, help="override the synthetic model's layer count")
    p.add_argument("--batch", type=int, default=None, help="default 32 (encoders), 8 (causal LMs)")
    p.add_argument("--seq", type=int, default=None, help="default 128 (encoders), 256 (causal LMs)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--r-p", dest="r_p", type=int, default=1)
    p.add_argument("--targets", default=None, help="comma-separated target modules (default: the paper's GLUE set)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--paths", default=None, help=f"of {','.join(PATHS)} (default activation,weight; causal LMs "
                   "activation)")
    p.add_argument("--scan-layers", action="store_true", help="the model's blocks under nn.scan (one compiled block)")
    p.add_argument("--no-full", action="store_true", help="skip full fine-tuning")
    p.add_argument("--dropout", action="store_true",
                   help="train with the model's dropout (as glue.py does): every JAX step and frozen-backprop draw "
                        "masks, the PyTorch peers run in train mode (encoders)")
    p.add_argument("--jax-masks", action="store_true",
                   help="with --dropout: also each JAX train step with jax.random.bernoulli's masks "
                        "(variants .../jax-masks; PERF.md change 26's before)")
    p.add_argument("--no-infer", action="store_true", help="skip inference")
    p.add_argument("--peft", action="store_true", help="also run the PyTorch/PEFT peer")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant after compiling")
    p.add_argument("--rounds", type=int, default=4,
                   help="passes over all variants (0: compile only, for compile times and memory)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up step, 1 round of 2 steps")
    p.add_argument("--out", default=None, help="JSON output (default experiments/results/bench-<model>.json, "
                   "causal LMs bench-decoder-<model>.json)")
    d = p.add_argument_group("causal LMs (experiments/bench_decoder.py)")
    d.add_argument("--causal-lm", action="store_true", help="--model is a causal LM (implied by smollm2, "
                   "gemma3-270m and --synthetic llama/gemma)")
    d.add_argument("--vocab", type=int, default=None, help="override the synthetic model's vocabulary size")
    d.add_argument("--vocab-chunk", type=int, default=8192, help="vocabulary columns per cross-entropy chunk")
    d.add_argument("--ce-vocabs", default="49152,262144",
                   help="vocabulary sizes of the cross-entropy memory comparison ('' to skip)")
    d.add_argument("--no-train", action="store_true", help="skip the training steps")
    d.add_argument("--no-generate", action="store_true", help="skip generation")
    d.add_argument("--gen-batch", type=int, default=None, help="prompts per generation batch (default --batch)")
    d.add_argument("--prompt-len", type=int, default=64)
    d.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (>= 2)")
    args = p.parse_args(argv)
    decoder = bench_decoder.is_decoder(args)
    args.batch = args.batch or (8 if decoder else 32)
    args.seq = args.seq or (256 if decoder else 128)
    args.paths = args.paths or ("activation" if decoder else "activation,weight")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the decode step is the difference of 1 and --new-tokens tokens)")
    for name in ("batch", "seq", "prompt_len", "vocab_chunk", "gen_batch", "vocab"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.quick:
        args.warmup, args.rounds, args.steps = 1, 1, 2
    for m in args.methods.split(","):
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; choose from {','.join(METHODS)}")
    for q in args.paths.split(","):
        if q not in PATHS:
            p.error(f"--paths: unknown path {q!r}; choose from {','.join(PATHS)}")
    if args.jax_masks and not args.dropout:
        p.error("--jax-masks compares dropout masks: add --dropout")
    if args.dropout and decoder:
        p.error("--dropout is for the encoders (the decoders have no dropout of their own); drop it")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if _decoder().is_decoder(args):
        return _decoder().main(args, argv)
    methods, paths = args.methods.split(","), args.paths.split(",")
    threads = len(os.sched_getaffinity(0))

    log = common.log
    with tempfile.TemporaryDirectory(prefix="sora_bench_") as tmp:
        setup = load_setup(args, Path(tmp))
        flops = flop_counts(setup)
        log(f"model {setup.name} ({setup.model_type}), batch {args.batch} x {args.seq}, targets {setup.targets}, "
            f"r {args.r}, r_p {args.r_p}; compiling")
        jv: list[Variant] = jax_matmul_variants()
        jv.append(jax_frozen_backprop_variant(setup, flops["frozen_backprop"], args.dropout))
        if not args.no_full:
            jv.append(jax_train_variant(setup, None, "activation", flops["full"], dropout=args.dropout))
        for m in methods:
            for q in paths:
                for old_masks in (False, True) if args.jax_masks else (False,):
                    jv.append(jax_train_variant(setup, m, q, flops[f"{m}/{q}"], dropout=args.dropout,
                                                with_jax_masks=old_masks))
                    log(f"  compiled {jv[-1].name}: {jv[-1].compile_s:.1f} s")
        if not args.no_infer:
            jv.extend(jax_infer_variants(setup, methods, paths, flops))
        tv: list[Variant] = []
        if args.peft:
            peer = TorchPeer(setup, threads, args.dropout)
            tv.extend(peer.matmul_variants())
            tv.append(peer.frozen_backprop_variant(flops["frozen_backprop"]))
            for tm, jm in TORCH_METHODS.items():
                if jm in methods:
                    tv.append(peer.train_variant(tm, flops.get(f"{jm}/activation")))
            if not args.no_infer:
                tv.append(peer.infer_variant(None, flops["infer/frozen"]))
                for tm, jm in TORCH_METHODS.items():
                    if jm in methods:
                        tv.append(peer.infer_variant(tm, flops.get(f"infer/{jm}/activation")))
        variants = interleave(jv, tv)
        log(f"{len(variants)} variants; measuring {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up")
        measure(variants, args.warmup, args.rounds, args.steps, log)

    results = {v.name: v.stats() for v in variants}
    ceiling = matmul_ceiling(results)
    ratios = summarise(results, flops, ceiling)
    checks = acceptance(results, ratios)
    lines: list[str] = []
    print_table(results, ratios, flops, checks, lambda s: (print(s), lines.append(s)))
    report = {
        **run_record(args, argv, threads),
        "model": setup.name, "model_type": setup.model_type, "batch": args.batch, "seq": args.seq,
        "r": args.r, "lora_alpha": args.alpha, "rotation_rank": args.r_p, "targets": list(setup.targets),
        "methods": methods, "paths": paths, "dropout": args.dropout, "jax_masks": args.jax_masks,
        "warmup": args.warmup, "rounds": args.rounds, "steps": args.steps,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "matmul_ceiling_gflops": ceiling,
        "flops": flops, "results": results, "ratios": ratios, "acceptance": checks,
    }
    out = Path(args.out) if args.out else ROOT / "experiments" / "results" / f"bench-{setup.name}.json"
    common.write_json_atomic(out, report, indent=1)
    log(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
