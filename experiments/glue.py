"""Fine-tune an encoder on a GLUE task with an adapter method (or in full) and report dev metrics.

Examples::

    python experiments/glue.py --method sora                       # MiniLM on MRPC, offline
    python experiments/glue.py --method lora --task rte --epochs 5 --lr 5e-4
    python experiments/glue.py --method sora --model microsoft/deberta-v3-base --task rte   # the paper
    python experiments/glue.py --grid --methods lora,sora --lrs 1e-4,5e-4 --seeds 0,1,2    # the protocol
    python experiments/glue.py --method sora --output-dir runs/x --resume                  # continue a run

Each run writes ``<output-dir>/results.json`` (configuration, dev metrics per epoch, best metric,
trainable parameters, step-time statistics, per-layer update spectrum, versions, devices),
``dev_predictions.npz`` (the last evaluation's logits and labels), the trained adapter
(``adapter/``) and orbax checkpoints (``checkpoints/``). ``--grid`` runs every method x learning rate
x seed and writes ``summary.json`` / ``summary.md``: mean +- std over seeds per method and learning
rate, and the best learning rate per method (docs/spec.md section 5).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import sora_jax
from experiments import common
from experiments.common import option, positive
from sora_jax import compile_cache, train
from sora_jax.checkpoint import Checkpointer, CheckpointError, ConfigMismatchError
from sora_jax.config import PAPER_TARGETS
from sora_jax.data import glue as data
from sora_jax.io import stale_temporaries

METHODS = ("full", *sora_jax.METHODS)
TASK_NAMES = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")

# the paper's six targets per encoder block (docs/spec.md section 5), for the encoders this CLI trains
TARGETS = {t: PAPER_TARGETS[t] for t in ("bert", "roberta", "xlm-roberta", "deberta-v2")}


def head_modules(freeze_pooler: bool = False) -> tuple[str, ...]:
    """``modules_to_save``: the classifier and, unless ``freeze_pooler`` (the paper's DeBERTa setting,
    docs/spec.md section 5), the pooler. A pooler that pre-training never trained (all-MiniLM-L6-v2's: bias 0,
    weight std 0.009) passes too little signal frozen: STS-B Pearson 0.02 against 0.83 trained."""
    return ("classifier",) if freeze_pooler else ("classifier", "pooler")


# default peak learning rates (adapter/base, head), chosen on MiniLM + MRPC
DEFAULT_LR = {"full": (5e-5, 5e-5), "adapter": (1e-3, 1e-3)}


# -- arguments ---------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _methods(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [m for m in out if m not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    return out


# The options, one dataclass per help group, in the order --help lists them. ``trajectory=False``: the option
# does not change the training trajectory and stays out of the resume fingerprint (run_config).
@dataclasses.dataclass
class RunOptions:
    method: str = option("sora", choices=METHODS)
    task: str = option("mrpc", choices=TASK_NAMES)
    model: str = option("minilm", "alias 'minilm', a Hugging Face hub id or a local directory")
    data_dir: str | None = option(
        None, "GLUE data root (default: sora_jax.data.glue.find_data_dir())", trajectory=False
    )


@dataclasses.dataclass
class TrainingOptions:
    _argument_group_name = "training"
    lr: float | None = option(None, "adapter lr (full: every param); default by method", type=positive(float))
    head_lr: float | None = option(None, "classifier lr; default by method", type=positive(float))
    epochs: int = option(5, type=positive(int))
    batch_size: int = option(32, type=positive(int))
    max_length: int = option(128, type=positive(int))
    pad_to_multiple: int = option(
        16,
        "batches pad to multiples of this on a ~1.5x ladder (data.length_rungs): fewer step shapes to compile",
        type=positive(int),
    )
    seed: int = option(0)
    max_train_samples: int | None = option(None, type=positive(int))
    max_eval_samples: int | None = option(None, type=positive(int))
    warmup_ratio: float = option(0.06)
    weight_decay: float = option(0.01)
    max_grad_norm: float | None = option(None, type=positive(float))
    grad_accum: int = option(1, type=positive(int))
    path: str = option("activation", "adapter on activations or on weights", choices=train.PATHS)
    no_dropout: bool = option(False, "train without the model's dropout")
    scan_layers: bool = common.scan_layers_option()
    remat: str = common.remat_option()
    freeze_pooler: bool = option(
        False, "train only the classifier, not the pooler (the paper's DeBERTa setting; default: both)"
    )


@dataclasses.dataclass
class OutputOptions:
    _argument_group_name = "output and checkpoints"
    output_dir: str | None = option(None, "default runs/<task>-<method>-<model>-lr<lr>-s<seed>", trajectory=False)
    resume: bool = option(False, "continue the run in --output-dir from its last checkpoint", trajectory=False)
    overwrite: bool = option(False, "start over: delete the checkpoints and outputs in --output-dir", trajectory=False)
    save_every: int = option(0, "checkpoint every N steps (0: only at epoch ends)", trajectory=False)
    keep: int = option(2, "checkpoints kept", type=positive(int), trajectory=False)
    export_merged: bool = option(False, "also export a merged transformers checkpoint", trajectory=False)
    no_progress: bool = option(False, "no progress bar", trajectory=False)
    report_to: str = option(
        "none",
        "also log per-step metrics to TensorBoard (<output-dir>/tensorboard); metrics.jsonl is always written",
        choices=("none", "tensorboard"),
        trajectory=False,
    )
    compile_cache: str = common.compile_cache_option()


@dataclasses.dataclass
class DeviceOptions:
    _argument_group_name = "devices"
    mesh: str | None = option(None, 'device mesh, e.g. "data=4,model=2" (default: one device)', trajectory=False)
    replicate_adapter: bool = option(False, "replicate adapter factors on the model axis", trajectory=False)


@dataclasses.dataclass
class GridOptions:
    _argument_group_name = "grid (the paper's protocol)"
    grid: bool = option(False, "run methods x lrs x seeds and write a summary table", trajectory=False)
    methods: list[str] | None = option(None, "grid methods (default: --method)", type=_methods, trajectory=False)
    lrs: list[float] | None = option(None, "grid learning rates (default: --lr)", type=_floats, trajectory=False)
    seeds: list[int] | None = option(None, "grid seeds (default: 0,1,2)", type=_ints, trajectory=False)


OPTIONS = (RunOptions, common.AdapterOptions, TrainingOptions, OutputOptions, DeviceOptions, GridOptions)


def build_parser() -> common.OptionParser:
    return common.OptionParser(
        OPTIONS,
        prog="glue.py",  # also when called as a function (python -c, tests), like main's error lines
        description="GLUE fine-tuning with LoRA, DoRA, Pre-Diag, SORA, Pre/Post-Ortho or full fine-tuning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.check_training_options(parser, args)
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if args.lrs and not all(math.isfinite(v) and v > 0 for v in args.lrs):
        parser.error(f"--lrs must be positive finite numbers, got {args.lrs}")
    if args.save_every < 0:
        parser.error(f"--save-every must be >= 0, got {args.save_every}")
    if not args.grid and (args.methods or args.lrs or args.seeds):
        parser.error("--methods/--lrs/--seeds only apply with --grid")
    return args


# -- helpers -----------------------------------------------------------------------------------------
def default_lrs(method: str) -> tuple[float, float]:
    return DEFAULT_LR["full" if method == "full" else "adapter"]


def model_tag(model: str) -> str:
    return Path(model.rstrip("/")).name.replace("/", "_") or "model"


def default_output_dir(args: argparse.Namespace) -> Path:
    return Path("runs") / f"{args.task}-{args.method}-{model_tag(args.model)}-lr{args.lr:g}-s{args.seed}"


def trajectory_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options in ``args`` that change the training trajectory (every option not marked
    ``trajectory=False``)."""
    return common.trajectory_options(args, OPTIONS)


def run_config(args: argparse.Namespace, adapter_config: Any, train_config: train.TrainConfig) -> dict[str, Any]:
    """Everything that determines the training trajectory (the resume fingerprint's input)."""
    cfg = trajectory_options(args)
    cfg["adapter"] = None if adapter_config is None else adapter_config.to_dict()
    cfg["train"] = train_config.to_dict()
    return cfg


# -- validation and the run's files -------------------------------------------------------------------
class UsageError(ValueError):
    """A flag, the device mesh or the output directory cannot be used (found before anything is loaded)."""


def check_output_dir(out_dir: Path) -> None:
    """``out_dir`` is (or can be created as) a writable directory; probed with a file created and removed."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output-dir {out_dir} is a file, not a directory; pass a directory path")
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--output-dir {out_dir}: {probe} is a file, not a directory; pass a directory path")
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UsageError(
            f"--output-dir {out_dir}: cannot write in {probe} ({e.strerror}); pass a writable directory"
        ) from None


def validate_run(args: argparse.Namespace, out_dir: Path) -> Any:
    """Check what needs neither data nor model: the device mesh (returned, ``None`` without ``--mesh``) and the
    output directory. Runs before anything is read, loaded, written or deleted."""
    from sora_jax.sharding import make_mesh

    try:
        mesh = make_mesh(args.mesh)
    except ValueError as e:
        raise UsageError(f"--mesh: {e}") from None
    if args.remat != "none" and not args.scan_layers:
        raise UsageError(f"--remat {args.remat} rematerialises scanned blocks; add --scan-layers")
    check_output_dir(out_dir)
    return mesh


# a run's final outputs (written atomically; --overwrite removes them with the checkpoints)
OUTPUTS = ("results.json", "dev_predictions.npz", "adapter", "merged")


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove the temporary files and directories an interrupted earlier run left in ``out_dir``."""
    if not out_dir.is_dir():
        return []
    written = ("results.json", "dev_predictions.npz", "metrics.jsonl", "summary.json", "summary.md")
    stale = [p for name in written for p in out_dir.glob(f".{name}.*")]
    stale += [p for name in ("adapter", "merged") for p in stale_temporaries(out_dir / name)]
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def remove_previous_run(out_dir: Path) -> None:
    """``--overwrite``: the checkpoints and final outputs of an earlier run in ``out_dir``."""
    for name in ("checkpoints", *OUTPUTS):
        p = out_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _lower(old: Any, new: Any) -> bool:
    return isinstance(old, (int, float)) and isinstance(new, (int, float)) and new < old


def _tighter(old: Any, new: Any) -> bool:
    return isinstance(new, (int, float)) and (old is None or (isinstance(old, (int, float)) and new < old))


# optimizer settings a resumed run may change when the flag is given explicitly (after a NaN stop)
RESUME_CHANGES = {"lr": _lower, "head_lr": _lower, "max_grad_norm": _tighter}


def resume_changes(explicit: set[str]) -> dict[str, Any]:
    """The ``Checkpointer(changeable=...)`` of the explicitly given optimizer flags (run config keys)."""
    return {key: test for name, test in RESUME_CHANGES.items() if name in explicit for key in (name, f"train.{name}")}


# -- one run -----------------------------------------------------------------------------------------
def evaluate(
    trainer: train.Trainer, state: train.TrainState, task: str, dev: dict[str, list[dict]]
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Dev metrics (``compute_metrics``; with several dev splits, keys ``<split>/<metric>`` and ``main``
    of the first) and, per split, logits and labels in the split's original example order."""
    metrics: dict[str, float] = {}
    preds: dict[str, np.ndarray] = {}
    for split, batches in dev.items():
        n = sum(int((np.asarray(b["weights"]) > 0).sum()) for b in batches)
        logits = np.zeros((n, trainer.num_labels), np.float32)
        labels = np.zeros((n,), np.asarray(batches[0]["labels"]).dtype)
        for b in batches:
            keep = np.asarray(b["weights"]) > 0
            idx = np.asarray(b["index"])[keep]
            logits[idx] = trainer.predict(state, b)[keep]
            labels[idx] = np.asarray(b["labels"])[keep]
        m = {k: float(v) for k, v in data.compute_metrics(task, logits, labels).items()}
        if len(dev) == 1:
            metrics.update(m)
        else:
            metrics.update({f"{split}/{k}": v for k, v in m.items()})
            metrics.setdefault("main", m["main"])
        preds[f"{split}_logits"], preds[f"{split}_labels"] = logits, labels
    return metrics, preds


class MetricsLog:
    """Per-step metrics as they happen: ``<out_dir>/metrics.jsonl`` (one JSON object a line: ``step``,
    ``epoch``, ``loss``, ``lr``, ``examples_per_s``; after each evaluation ``step``, ``epoch`` and the dev
    metrics under ``eval``), and with ``tensorboard`` the same scalars in ``<out_dir>/tensorboard``.

    A resumed run first drops the lines past its checkpoint's step, so every step appears once.
    """

    def __init__(self, out_dir: Path, start_step: int, tensorboard: bool = False):
        self.path = out_dir / "metrics.jsonl"
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step and self.path.exists():
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line + "\n")
        common.write_text_atomic(self.path, "".join(kept))
        self.file = self.path.open("a", buffering=1)
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, default=common.json_default) + "\n")

    def step(self, info: train.StepInfo, lr: float) -> None:
        rate = info.examples / max(info.seconds, 1e-9)
        self._write({"step": info.step, "epoch": info.epoch + 1, "loss": info.loss, "lr": lr, "examples_per_s": rate})
        if self.writer is not None:
            self.writer.add_scalar("train/loss", info.loss, info.step)
            self.writer.add_scalar("train/lr", lr, info.step)
            self.writer.add_scalar("train/examples_per_s", rate, info.step)

    def epoch(self, record: dict[str, Any]) -> None:
        metrics = {k: v for k, v in record.items() if k not in ("epoch", "step") and isinstance(v, (int, float))}
        self._write({"step": record["step"], "epoch": record["epoch"], "eval": metrics})
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"eval/{k}", v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate one configuration; returns (and writes) its results."""
    explicit = {k for k in RESUME_CHANGES if getattr(args, k) is not None}
    lr_default, head_default = default_lrs(args.method)
    args.lr = args.lr if args.lr is not None else lr_default
    args.head_lr = args.head_lr if args.head_lr is not None else head_default
    out_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args)
    mesh = validate_run(args, out_dir)
    data_dir = args.data_dir if args.data_dir else data.find_data_dir()
    task = data.get_task(args.task)

    # data first: a missing or malformed file fails before the model is loaded
    train_split = data.load_split(args.task, "train", data_dir, args.max_train_samples)
    dev_splits = {s: data.load_split(args.task, s, data_dir, args.max_eval_samples) for s in task.dev_splits}
    model = sora_jax.load_pretrained(
        args.model,
        task="sequence_classification",
        num_labels=task.num_labels,
        scan_layers=args.scan_layers,
        remat=args.remat,
    )
    if model.tokenizer is None:
        raise FileNotFoundError(
            f"model {args.model!r} ({model.path}) has no tokenizer files; save its tokenizer beside it "
            f"(tokenizer.save_pretrained)"
        )
    model_type = model.config.model_type
    if model_type not in TARGETS:
        raise ValueError(f"no GLUE target modules known for model_type {model_type!r}; known: {sorted(TARGETS)}")
    num_labels = task.num_labels
    train_enc = data.encode(model.tokenizer, train_split, args.max_length)
    dev = {
        s: data.epoch_batches(
            data.encode(model.tokenizer, split, args.max_length),
            args.batch_size,
            seed=0,
            epoch=0,
            shuffle=False,
            pad_to_multiple=args.pad_to_multiple,
        )
        for s, split in dev_splits.items()
    }

    def train_batches(epoch: int) -> list[dict]:
        return data.epoch_batches(
            train_enc, args.batch_size, seed=args.seed, epoch=epoch, shuffle=True, pad_to_multiple=args.pad_to_multiple
        )

    steps_per_epoch = len(train_batches(0))
    total_steps = steps_per_epoch * args.epochs
    head = head_modules(args.freeze_pooler)
    adapter_config = None
    if args.method != "full":
        adapter_config = sora_jax.AdapterConfig(
            method=args.method,
            r=args.r,
            lora_alpha=args.lora_alpha,
            rotation_rank=args.rotation_rank,
            rotation=args.rotation,
            lora_dropout=args.lora_dropout,
            target_modules=TARGETS[model_type],
            modules_to_save=head,
            kernel_axes=model.kernel_axes(),
        )
    train_config = train.TrainConfig(
        lr=args.lr,
        head_lr=args.head_lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        grad_accum=args.grad_accum,
        path=args.path,
        dropout=not args.no_dropout,
        max_grad_norm=args.max_grad_norm,
    )
    cfg = run_config(args, adapter_config, train_config)
    ckpt_dir = out_dir / "checkpoints"
    if args.overwrite:
        remove_previous_run(out_dir)
    remove_stale_temporaries(out_dir)
    try:
        checkpointer = Checkpointer(
            ckpt_dir, cfg, keep=args.keep, resume=args.resume, changeable=resume_changes(explicit)
        )
    except ConfigMismatchError as e:
        raise ConfigMismatchError(
            f"{e} (A resumed run may lower --lr / --head-lr or set a lower --max-grad-norm, given explicitly.)"
        ) from None
    trainer = train.Trainer(
        model.apply,
        model.params,
        num_labels=num_labels,
        total_steps=total_steps,
        adapter_config=adapter_config,
        modules_to_save=head,
        config=train_config,
        mesh=mesh,
        shard_adapter=not args.replicate_adapter,
    )
    state = trainer.init_state(args.seed)
    n_params = trainer.count_parameters(state)
    last_eval: dict[str, Any] = {}
    eval_seconds: list[float] = []

    def do_eval(s: train.TrainState) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics, preds = evaluate(trainer, s, args.task, dev)
        eval_seconds.append(time.perf_counter() - t0)
        last_eval.update(preds)
        return metrics

    start_step = (checkpointer.latest_step() or 0) if args.resume else 0
    desc = f"{args.task}/{args.method}"
    progress = common.Progress(total_steps, start_step, desc, not args.no_progress)
    schedule = train.lr_schedule(args.lr, total_steps, args.warmup_ratio)
    log = MetricsLog(out_dir, start_step, tensorboard=args.report_to == "tensorboard")

    def on_step(info: train.StepInfo) -> None:
        progress.step(info)
        log.step(info, float(schedule(info.step - 1)))

    base_results = {
        "config": cfg,
        "fingerprint": checkpointer.fingerprint,
        "output_dir": str(out_dir),
        "model_path": str(model.path),
        "data": {"train": train_split.source, **{s: split.source for s, split in dev_splits.items()}},
        "num_train_examples": len(train_split),
        "num_eval_examples": {s: len(split) for s, split in dev_splits.items()},
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "parameters": n_params,
        "versions": common.versions(),
        "devices": common.devices(),
        "cpu_count": len(os.sched_getaffinity(0)),  # the cores this process may run on
        "mesh": args.mesh,
    }

    def on_epoch(history: list[dict]) -> None:
        progress.epoch(history[-1])
        log.epoch(history[-1])
        common.write_json_atomic(out_dir / "results.json", {**base_results, "history": history, "finished": False})

    compiled_before = compile_cache.compile_seconds()
    t_start = time.perf_counter()
    try:
        result = train.fit(
            trainer,
            state,
            train_batches=train_batches,
            epochs=args.epochs,
            evaluate=do_eval,
            checkpointer=checkpointer,
            save_every=args.save_every,
            resume=args.resume,
            on_step=on_step,
            on_epoch=on_epoch,
        )
    finally:
        progress.close()
        log.close()
        checkpointer.close()
    wall = time.perf_counter() - t_start
    history = result.history
    if not last_eval:  # a finished run resumed: its predictions again, so that every output is (re)written
        do_eval(result.state)
    metric = "main"
    best = max(history, key=lambda h: h[metric])
    timing = result.timing()
    compiled = compile_cache.compile_seconds()
    timing.update(
        train_wall_s=wall,
        eval_s=float(np.sum(eval_seconds)),
        examples_per_s=args.batch_size / timing["median_s"] if "median_s" in timing else None,
        # JAX's own accounting of the training and evaluation: tracing, lowering, XLA or cache loading
        jax_compile={k: compiled[k] - compiled_before[k] for k in compiled},
    )
    results = {
        **base_results,
        "finished": True,
        "history": history,
        "best": {"metric": task.main_metric, "value": best[metric], "epoch": best["epoch"], "metrics": best},
        "final": history[-1],
        "timing": timing,
        "resumed_from_step": result.resumed_from,
        "spectrum": update_spectrum(trainer, result.state, model, TARGETS[model_type]),
    }
    common.save_npz_atomic(out_dir / "dev_predictions.npz", last_eval)
    adapter = trainer.adapter(result.state)
    if adapter is not None:
        sora_jax.save_adapter(jax.device_get(adapter), out_dir / "adapter")
    if args.export_merged:
        params = jax.device_get(trainer.params(result.state))
        merged = sora_jax.export_merged(model, params, jax.device_get(adapter), out_dir / "merged")
        results["merged"] = str(merged)
    common.write_json_atomic(out_dir / "results.json", results)
    print(
        f"{desc}: best {task.main_metric} {best[metric]:.4f} (epoch {best['epoch']}); final "
        f"{ {k: round(v, 4) for k, v in history[-1].items() if isinstance(v, float)} }; "
        f"train {wall:.0f} s, of it compiling {timing['compile_s']:.1f} s ({timing['compiles']} shapes; "
        f"JAX compile time {timing['jax_compile']['total_s']:.1f} s); "
        f"results in {out_dir / 'results.json'}"
    )
    return results


def update_spectrum(
    trainer: train.Trainer, state: train.TrainState, model: sora_jax.PretrainedModel, targets: Sequence[str]
) -> dict:
    """Per adapted layer (Hugging Face's per-layer paths, also for scanned layers): entropy, effective rank
    and stable rank of ``Delta W`` (full fine-tuning: of the trained minus the pretrained kernel of the
    same target modules)."""
    params = jax.device_get(trainer.params(state))
    adapter = trainer.adapter(state)
    if adapter is not None:
        return common.per_layer_spectrum(sora_jax.spectrum(params, jax.device_get(adapter)), model.stacked)
    from sora_jax.adapter import find_modules
    from sora_jax.spectrum import spectrum_of

    select = sora_jax.AdapterConfig(target_modules=tuple(targets))
    new, old = find_modules(model.per_layer(params)), find_modules(model.per_layer(model.params))
    return {
        p: spectrum_of(np.asarray(new[p].kernel, np.float64) - np.asarray(old[p].kernel, np.float64))
        for p in sorted(new)
        if select.targets(p)
    }


# -- the grid ----------------------------------------------------------------------------------------
def run_grid(args: argparse.Namespace) -> dict[str, Any]:
    """Every method x lr x seed (each run in ``<output-dir>/<method>-lr<lr>-s<seed>``); a summary of each
    run's best-epoch dev score (the task's GLUE score): mean +- std over seeds per method and lr, and the
    lr with the best mean per method (docs/spec.md section 5)."""
    methods = args.methods or [args.method]
    seeds = args.seeds if args.seeds is not None else [0, 1, 2]
    root = Path(args.output_dir) if args.output_dir else Path("runs") / f"grid-{args.task}-{model_tag(args.model)}"
    rows = []
    for method in methods:
        lrs = args.lrs or [args.lr if args.lr is not None else default_lrs(method)[0]]
        for lr in lrs:
            for seed in seeds:
                sub = argparse.Namespace(**vars(args))
                sub.grid, sub.method, sub.lr, sub.seed = False, method, lr, seed
                sub.output_dir = str(root / f"{method}-lr{lr:g}-s{seed}")
                res = run(sub)  # with --resume a finished run restores its final checkpoint, trains nothing
                rows.append(
                    {
                        "method": method,
                        "lr": lr,
                        "seed": seed,
                        "metric": res["best"]["metric"],
                        "value": res["best"]["value"],
                        "output_dir": sub.output_dir,
                    }
                )
    summary = summarize(rows)
    common.write_json_atomic(
        root / "summary.json", {"task": args.task, "model": args.model, "runs": rows, "summary": summary}
    )
    table = summary_markdown(args.task, summary)
    common.write_text_atomic(root / "summary.md", table)
    print(table)
    return summary


def summarize(rows: list[dict]) -> dict[str, Any]:
    """``{method: {"by_lr": {lr: {"mean", "std", "n"}}, "best_lr", "mean", "std", "metric"}}``; std is
    the sample standard deviation (ddof=1; 0 for a single seed)."""
    out: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        by_lr = {}
        for lr in dict.fromkeys(r["lr"] for r in rows if r["method"] == method):
            vals = np.array([r["value"] for r in rows if r["method"] == method and r["lr"] == lr], np.float64)
            std = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
            by_lr[f"{lr:g}"] = {"mean": float(vals.mean()), "std": std, "n": int(vals.size)}
        best_lr = max(by_lr, key=lambda k: by_lr[k]["mean"])
        metric = next(r["metric"] for r in rows if r["method"] == method)
        out[method] = {"metric": metric, "best_lr": float(best_lr), **by_lr[best_lr], "by_lr": by_lr}
    return out


def summary_markdown(task: str, summary: dict[str, Any]) -> str:
    lrs = sorted({lr for s in summary.values() for lr in s["by_lr"]}, key=float)
    head = "| method | metric | best lr | best (mean ± std) | " + " | ".join(f"lr {lr}" for lr in lrs) + " |"
    sep = "|" + "---|" * (4 + len(lrs))
    lines = [f"## {task}", "", head, sep]
    for method, s in summary.items():
        cells = []
        for lr in lrs:
            v = s["by_lr"].get(lr)
            cells.append(f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}" if v else "")
        lines.append(
            f"| {method} | {s['metric']} | {s['best_lr']:g} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


# problems with the user's input or files: reported as one line, exit status 2
USER_ERRORS = (
    UsageError,
    data.GlueDataError,
    CheckpointError,
    sora_jax.AdapterError,
    FileNotFoundError,
    train.NonFiniteLossError,
    sora_jax.CheckpointMismatchError,
)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return common.run_command(
        "glue.py", args.compile_cache, lambda: run_grid(args) if args.grid else run(args), USER_ERRORS
    )


if __name__ == "__main__":
    raise SystemExit(main())
