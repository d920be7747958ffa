"""Instruction-tune a decoder with an adapter on commonsense or math reasoning (LLM-Adapters' protocol) and
evaluate it by generation.

Examples::

    python experiments/reasoning.py --suite commonsense --method sora                 # smollm2, offline
    python experiments/reasoning.py --suite math --method lora --model gemma3-270m
    python experiments/reasoning.py --suite commonsense --method dora --model meta-llama/Meta-Llama-3-8B \\
        --train-file commonsense_15k.json --r 16 --lora-alpha 32 --lr 2e-4 --epochs 3     # the paper's setting
    python experiments/reasoning.py --suite math --output-dir runs/x --resume              # continue a run

Data (``--data-dir``, default ``../shared/data/llm-adapters``; layout in its README): every test set of the
suite, in LLM-Adapters' ``{"instruction", "input", "output", "answer"}`` format. Training set: ``--train-file``
(a JSON list in that format, e.g. Commonsense-15k or MetaMathQA), else for ``commonsense`` the training sets
present (BoolQ, ARC-Easy, ARC-Challenge, OpenBookQA), and for ``math`` GSM8K's train split (its calculator
annotations removed, the final ``#### N`` written "The answer is N.").

Training: LLM-Adapters' prompt, the loss on the response (``output`` and EOS) only, batches bucketed by
length, the cross-entropy chunked over the vocabulary (``sora_jax.lm``), the adapter on the paper's decoder
targets (``q_proj, k_proj, v_proj, up_proj, down_proj``; ``--all-linear`` adds ``o_proj, gate_proj``).
Evaluation: greedy generation (at most 32 new tokens for commonsense, 256 for math), LLM-Adapters'
answer extraction, accuracy per task on the first ``--max-eval-samples`` examples of each test set, and
their average. Writes ``<output-dir>/results.json`` (configuration, per-task accuracy, average, training
loss, timings, update spectrum, versions), ``predictions/<task>.json`` (every response) and the adapter.
``--resume`` continues training from the last checkpoint and reuses finished tasks' predictions.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import sora_jax
from experiments import common
from experiments.common import option, positive
from sora_jax import lm, train
from sora_jax.checkpoint import Checkpointer, CheckpointError
from sora_jax.config import PAPER_DECODER_TARGETS
from sora_jax.generate import generate_text

SUITES = {"commonsense": lm.COMMONSENSE_TASKS, "math": lm.MATH_TASKS}
TRAIN_SETS = {"commonsense": ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"), "math": ("gsm8k-train",)}
DEFAULT_MODEL = {"commonsense": "smollm2", "math": "gemma3-270m"}
MAX_NEW_TOKENS = {"commonsense": 32, "math": 256}
TARGETS = PAPER_DECODER_TARGETS  # DoRA's commonsense setting
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STOP = ("### Instruction", "\n\n\n")


class ReasoningDataError(ValueError):
    """A missing or malformed data file."""


# -- arguments ---------------------------------------------------------------------------------------
# The options, one dataclass per help group, in the order --help lists them. ``trajectory=False``: the option
# does not change the training trajectory and stays out of the resume fingerprint (run_config).
@dataclasses.dataclass
class RunOptions:
    suite: str = option(choices=sorted(SUITES))
    method: str = option("sora", choices=sora_jax.METHODS)
    model: str | None = option(None, "alias (smollm2, gemma3-270m), hub id, directory or .gguf file")
    data_dir: str | None = option(None, "default: ../shared/data/llm-adapters beside the repository", trajectory=False)
    train_file: str | None = option(None, "a JSON list in LLM-Adapters' format (default: see above)")
    tasks: str | None = option(None, "comma-separated test sets (default: the whole suite)", trajectory=False)


@dataclasses.dataclass
class AdapterOptions(common.AdapterOptions):
    lora_alpha: float = option(32.0, type=positive(float))  # DoRA's commonsense setting: alpha 2 r
    lora_dropout: float = option(0.05)
    all_linear: bool = option(False, "adapt every linear layer of each block")


@dataclasses.dataclass
class TrainingOptions:
    _argument_group_name = "training"
    lr: float = option(2e-4, type=positive(float))
    epochs: int = option(1, type=positive(int))
    batch_size: int = option(16, type=positive(int))
    grad_accum: int = option(1, type=positive(int))
    max_length: int = option(256, type=positive(int))
    max_train_samples: int | None = option(None, type=positive(int))
    warmup_ratio: float = option(0.03)
    weight_decay: float = option(0.0)
    max_grad_norm: float = option(1.0, type=positive(float))
    vocab_chunk: int = option(8192, "vocabulary columns per loss chunk", type=positive(int))
    seed: int = option(0)
    zero_shot: bool = option(False, "no training: evaluate the base model")
    scan_layers: bool = common.scan_layers_option()
    remat: str = common.remat_option()


@dataclasses.dataclass
class EvaluationOptions:
    _argument_group_name = "evaluation"
    max_eval_samples: int | None = option(None, "the first N of each test set", type=positive(int), trajectory=False)
    eval_batch_size: int = option(16, type=positive(int), trajectory=False)
    max_new_tokens: int | None = option(None, "default: 32 commonsense, 256 math", type=positive(int), trajectory=False)


@dataclasses.dataclass
class OutputOptions:
    _argument_group_name = "output and checkpoints"
    output_dir: str | None = option(None, "default runs/<suite>-<method>-<model>-s<seed>", trajectory=False)
    resume: bool = option(False, trajectory=False)
    overwrite: bool = option(False, trajectory=False)
    save_every: int = option(0, trajectory=False)
    keep: int = option(2, type=positive(int), trajectory=False)
    no_progress: bool = option(False, trajectory=False)
    compile_cache: str = common.compile_cache_option()


OPTIONS = (RunOptions, AdapterOptions, TrainingOptions, EvaluationOptions, OutputOptions)


def build_parser() -> common.OptionParser:
    return common.OptionParser(
        OPTIONS, prog="reasoning.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )


def trajectory_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options in ``args`` that change the training trajectory (every option not marked
    ``trajectory=False``)."""
    return common.trajectory_options(args, OPTIONS)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.check_training_options(parser, args)
    tasks = SUITES[args.suite]
    if args.tasks:
        chosen = [t.strip() for t in args.tasks.split(",") if t.strip()]
        bad = [t for t in chosen if t not in tasks]
        if bad:
            parser.error(f"unknown {args.suite} task(s) {bad}; choose from {', '.join(tasks)}")
        args.tasks = ",".join(chosen)
    args.model = args.model or DEFAULT_MODEL[args.suite]
    args.max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS[args.suite]
    return args


# -- data --------------------------------------------------------------------------------------------
def find_data_dir() -> Path:
    return common.ROOT.parent / "shared" / "data" / "llm-adapters"


def read_examples(path: Path) -> list[dict[str, Any]]:
    """A JSON list of ``{"instruction", "output", ...}`` (LLM-Adapters' format)."""
    if not path.is_file():
        raise ReasoningDataError(f"{path} does not exist; pass --data-dir (layout: the data README) or --train-file")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReasoningDataError(f"{path} is not valid JSON ({e}); expected a list of instruction records") from e
    if not isinstance(rows, list) or not rows:
        raise ReasoningDataError(f"{path} must hold a non-empty JSON list of instruction records")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise ReasoningDataError(f"{path}, record {i}: needs string fields 'instruction' and 'output'; got {r!r:.200}")
    return rows


def gsm8k_train(path: Path) -> list[dict[str, Any]]:
    """GSM8K's ``train.jsonl`` as instruction records: calculator annotations removed, ``#### N`` ->
    ``The answer is N.``"""
    if not path.is_file():
        raise ReasoningDataError(f"{path} does not exist; pass --data-dir or --train-file")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            solution, final = r["answer"].rsplit("####", 1)
        except (json.JSONDecodeError, KeyError, ValueError) as e:
            raise ReasoningDataError(f"{path}, line {i + 1}: expected {{question, answer ending '#### N'}}") from e
        solution = re.sub(r"<<[^>]*>>", "", solution).strip()
        final = final.strip().replace(",", "")
        rows.append({"instruction": r["question"], "input": "", "output": f"{solution}\nThe answer is {final}.",
                     "answer": final})
    return rows


def training_examples(args: argparse.Namespace, data_dir: Path) -> tuple[list[dict], list[str]]:
    if args.train_file:
        return read_examples(Path(args.train_file)), [str(args.train_file)]
    rows, sources = [], []
    for name in TRAIN_SETS[args.suite]:
        if name == "gsm8k-train":
            path = data_dir / "math" / name / "train.jsonl"
            rows += gsm8k_train(path)
        else:
            path = data_dir / args.suite / name / "train.json"
            rows += read_examples(path)
        sources.append(str(path))
    return rows, sources


# -- evaluation --------------------------------------------------------------------------------------
def evaluate_task(task: str, examples: list[dict], responses: list[str]) -> dict[str, Any]:
    correct = [lm.is_correct(task, r, ex["answer"]) for r, ex in zip(responses, examples, strict=True)]
    return {"accuracy": float(np.mean(correct)), "n": len(correct), "correct": int(np.sum(correct))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (unless ``--zero-shot``) and evaluate one configuration; returns (and writes) its results."""
    tag = Path(args.model.rstrip("/")).name.replace("/", "_")
    name = "zero_shot" if args.zero_shot else args.method  # the base model: no method
    out_dir = Path(args.output_dir or Path("runs") / f"{args.suite}-{name}-{tag}-s{args.seed}")
    data_dir = Path(args.data_dir) if args.data_dir else find_data_dir()
    tasks = args.tasks.split(",") if args.tasks else list(SUITES[args.suite])
    # data first: a missing or malformed file fails before the model is loaded
    tests = {t: read_examples(data_dir / args.suite / t / "test.json")[: args.max_eval_samples] for t in tasks}
    for t, rows in tests.items():
        if any("answer" not in r for r in rows):
            raise ReasoningDataError(f"test set {t}: every record needs an 'answer' field")
    train_rows, train_sources = ([], []) if args.zero_shot else training_examples(args, data_dir)
    if args.max_train_samples:
        train_rows = [train_rows[i] for i in np.random.default_rng(args.seed).permutation(len(train_rows))][
            : args.max_train_samples
        ]
    model = sora_jax.load_pretrained(args.model, task="causal_lm", scan_layers=args.scan_layers, remat=args.remat)
    tok = model.tokenizer
    if tok is None:
        raise FileNotFoundError(f"model {args.model!r} has no tokenizer; save one beside it")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    targets = ALL_LINEAR if args.all_linear else TARGETS
    adapter_config = sora_jax.AdapterConfig(
        method=args.method, r=args.r, lora_alpha=args.lora_alpha, rotation_rank=args.rotation_rank,
        rotation=args.rotation, lora_dropout=args.lora_dropout, target_modules=targets, modules_to_save=(),
        kernel_axes=model.kernel_axes(),
    )
    train_config = train.TrainConfig(
        lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, grad_accum=args.grad_accum,
        dropout=False, max_grad_norm=args.max_grad_norm,
    )
    encoded = lm.encode_examples(tok, train_rows, args.max_length)

    def train_batches(epoch: int) -> list[dict]:
        return lm.epoch_batches(encoded, args.batch_size, args.seed, epoch, pad_id)

    steps_per_epoch = len(train_batches(0)) if encoded else 0
    total_steps = steps_per_epoch * args.epochs
    cfg = trajectory_options(args)
    cfg.update(adapter=adapter_config.to_dict(), train=train_config.to_dict())
    ckpt_dir = out_dir / "checkpoints"
    pred_dir = out_dir / "predictions"
    if args.overwrite:
        for d in (ckpt_dir, pred_dir):
            shutil.rmtree(d, ignore_errors=True)
    checkpointer = Checkpointer(ckpt_dir, cfg, keep=args.keep, resume=args.resume)
    softcap = getattr(model.module.config, "final_logit_softcapping", None)
    trainer = train.Trainer(
        functools.partial(model.apply, return_logits=False), model.params, num_labels=model.module.config.vocab_size,
        total_steps=max(total_steps, 1), adapter_config=adapter_config, config=train_config,
        loss_fn=lm.causal_lm_loss(args.vocab_chunk, softcap),
    )
    state = trainer.init_state(args.seed)
    base_results = {
        "config": cfg,
        "fingerprint": checkpointer.fingerprint,
        "output_dir": str(out_dir),
        "model_path": str(model.report.get("weights_file")),
        "data": {"train": train_sources, "test": {t: str(data_dir / args.suite / t / "test.json") for t in tasks}},
        "num_train_examples": len(train_rows),
        "num_eval_examples": {t: len(r) for t, r in tests.items()},
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "parameters": trainer.count_parameters(state),
        "versions": common.versions(),
        "devices": common.devices(),
    }
    t0 = time.perf_counter()
    history: list[dict] = []
    timing: dict[str, Any] = {}
    resumed_from = None
    if total_steps:
        progress = common.Progress(total_steps, (checkpointer.latest_step() or 0) if args.resume else 0,
                            f"{args.suite}/{args.method}", not args.no_progress)
        try:
            result = train.fit(trainer, state, train_batches=train_batches, epochs=args.epochs,
                               checkpointer=checkpointer, save_every=args.save_every, resume=args.resume,
                               on_step=progress.step, on_epoch=lambda h: progress.epoch(h[-1]))
        finally:
            progress.close()
            checkpointer.close()
        state, history, timing, resumed_from = result.state, result.history, result.timing(), result.resumed_from
    else:
        checkpointer.close()
    timing["train_wall_s"] = time.perf_counter() - t0
    adapter = jax.device_get(trainer.adapter(state))
    params = trainer.params(state)
    # evaluation on merged weights: the same function as the adapter on activations, at the base model's cost
    eval_params = params if args.zero_shot else sora_jax.merge(params, adapter)
    scores: dict[str, Any] = {}
    t1 = time.perf_counter()
    for task, rows in tests.items():
        pred_file = pred_dir / f"{task}.json"
        if args.resume and pred_file.is_file():
            saved = json.loads(pred_file.read_text())
            if saved.get("fingerprint") == checkpointer.fingerprint and len(saved["responses"]) == len(rows):
                scores[task] = evaluate_task(task, rows, saved["responses"])
                continue
        responses = generate_text(
            model.module, eval_params, tok, [lm.prompt(r) for r in rows], max_new_tokens=args.max_new_tokens,
            stop=STOP, batch_size=args.eval_batch_size,
        )
        common.write_json_atomic(pred_file, {"fingerprint": checkpointer.fingerprint, "responses": responses})
        scores[task] = evaluate_task(task, rows, responses)
        print(f"{task}: accuracy {scores[task]['accuracy']:.4f} ({scores[task]['correct']}/{scores[task]['n']})")
    timing["eval_s"] = time.perf_counter() - t1
    average = float(np.mean([s["accuracy"] for s in scores.values()]))
    results = {
        **base_results,
        "finished": True,
        "history": history,
        "accuracy": {t: s["accuracy"] for t, s in scores.items()},
        "average": average,
        "scores": scores,
        "timing": timing,
        "resumed_from_step": resumed_from,
        "spectrum": {} if args.zero_shot else common.per_layer_spectrum(
            sora_jax.spectrum(jax.device_get(params), adapter), model.stacked
        ),
    }
    if not args.zero_shot:
        sora_jax.save_adapter(adapter, out_dir / "adapter")
    common.write_json_atomic(out_dir / "results.json", results)
    print(f"{args.suite}/{name}: average accuracy {average:.4f}; results in {out_dir / 'results.json'}")
    return results


USER_ERRORS = (ReasoningDataError, CheckpointError, sora_jax.AdapterError, FileNotFoundError,
               train.NonFiniteLossError, sora_jax.CheckpointMismatchError)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.remat != "none" and not args.scan_layers:
        print(f"reasoning.py: error: --remat {args.remat} rematerialises scanned blocks; add --scan-layers",
              file=sys.stderr)
        return 2
    return common.run_command("reasoning.py", args.compile_cache, lambda: run(args), USER_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
