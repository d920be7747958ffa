"""The paper's decoder experiments at the scale of a CPU: commonsense reasoning on ``smollm2`` and math
on ``gemma3-270m``, as one resumable list of ``reasoning.py`` runs and a report regenerated from the
kept results alone.

    python experiments/reasoning_study.py plan               # every run, and which are done
    python experiments/reasoning_study.py run --max-runs 2   # the next 2 unfinished runs (resumable)
    python experiments/reasoning_study.py report             # the tables; no training

The study (LLM-Adapters' protocol as ``reasoning.py`` implements it; r 16, alpha 32, r_p 1, lr 2e-4,
batch 16, one epoch, seed 0, scanned layers, the paper's decoder targets q/k/v/up/down):

- ``commonsense``: SmolLM2-135M-Instruct (4-bit GGUF, dequantised) zero-shot, then LoRA, DoRA, Pre-Diag
  and SORA fine-tuned on 1,280 examples drawn (seeded) from the commonsense training mix here (BoolQ,
  ARC-e, ARC-c, OBQA train); evaluated by greedy generation on the first 100 examples of each of the
  seven test sets.
- ``math``: Gemma 3 270M (4-bit GGUF, dequantised) zero-shot, then LoRA and SORA (then DoRA and
  Pre-Diag) fine-tuned on 640 problems drawn from GSM8K train; evaluated on the first 40 problems of
  each of the six test sets (at most 256 new tokens).

Each run trains in ``runs/reasoning-study/<id>`` (a killed run resumes from its checkpoint) and, once
finished, its ``results.json`` and ``predictions/`` (every generated response) are copied to
``experiments/reasoning_study/results/<id>/``. A kept finished run is never trained again; the report
reads only that folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments import common, reproduce  # reproduce: the grid machinery (train, load_result) of both studies

ROOT = common.ROOT
HERE = ROOT / "experiments" / "reasoning_study"
RESULTS = HERE / "results"
SCRATCH = ROOT / "runs" / "reasoning-study"
KEPT_FILES = ("results.json", "predictions")
DATA = ROOT.parent / "shared" / "data" / "llm-adapters"


@dataclasses.dataclass(frozen=True)
class Suite:
    model: str
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    train_samples: int
    eval_samples: int
    max_length: int


SUITES = {
    "commonsense": Suite(
        "smollm2",
        ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"),
        ("zero_shot", "zero_shot_rank", "lora", "dora", "prediag", "sora"),
        1280,
        100,
        256,
    ),
    "math": Suite(
        "gemma3-270m",
        ("gsm8k", "SVAMP", "AddSub", "MultiArith", "SingleEq", "AQuA"),
        ("zero_shot", "lora", "sora", "dora", "prediag"),
        640,
        40,
        384,
    ),
}
LR = 2e-4
SEED = 0


@dataclasses.dataclass(frozen=True)
class Run:
    """One ``reasoning.py`` run of the study."""

    suite: str
    method: str

    @property
    def part(self) -> str:
        return self.suite

    @property
    def id(self) -> str:
        return f"{self.suite}-{self.method}-{SUITES[self.suite].model}-s{SEED}"

    @property
    def script(self) -> str:
        return "reasoning_study.py" if self.method == "zero_shot_rank" else "reasoning.py"

    def argv(self, output_dir: Path) -> list[str]:
        s = SUITES[self.suite]
        if self.method == "zero_shot_rank":
            return ["rank", "--suite", self.suite, "--output-dir", str(output_dir)]
        method = ["--zero-shot"] if self.method == "zero_shot" else ["--method", self.method]
        return [
            "--suite", self.suite,
            *method,
            "--model", s.model,
            "--lr", f"{LR:g}",
            "--seed", str(SEED),
            "--max-train-samples", str(s.train_samples),
            "--max-eval-samples", str(s.eval_samples),
            "--max-length", str(s.max_length),
            "--scan-layers",
            "--save-every", "10",  # a killed run resumes within 10 steps
            "--output-dir", str(output_dir),
            "--no-progress",
        ]  # fmt: skip


def plan() -> list[Run]:
    """Every run in training order: commonsense first, then math (LoRA and SORA before DoRA, Pre-Diag)."""
    return [Run(suite, m) for suite, s in SUITES.items() for m in s.methods]


def load_result(run: Run) -> dict[str, Any] | None:
    return reproduce.load_result(run.id, RESULTS)


# -- the report ----------------------------------------------------------------------------------------
NAMES = {"zero_shot": "zero-shot (base)", "zero_shot_rank": "zero-shot (base), ranked choices", **reproduce.NAMES}


def choices(example: dict[str, Any]) -> list[str]:
    """The answer vocabulary an example offers (its instruction's ``Answer format: a/b/c`` line), else []."""
    found = re.search(r"Answer format: (\S+)", example["instruction"])
    return found.group(1).split("/") if found else []


def test_rows(suite: str, task: str) -> list[dict[str, Any]]:
    """The evaluated subset: the first ``eval_samples`` examples of the task's test set."""
    return json.loads((DATA / suite / task / "test.json").read_text())[: SUITES[suite].eval_samples]


def trivial(suite: str) -> dict[str, tuple[float | None, float]]:
    """Per task on the evaluated subset, in %: uniform chance over each example's offered answers (None
    where the answer is free, as math's numbers), and the share of the most frequent gold answer (a model
    that always gives it scores that)."""
    out = {}
    for task in SUITES[suite].tasks:
        if not (DATA / suite / task / "test.json").exists():
            continue
        rows = test_rows(suite, task)
        answers = [str(r["answer"]).strip() for r in rows]
        majority = 100.0 * Counter(answers).most_common(1)[0][1] / len(answers)
        ks = [len(choices(r)) or (5 if task == "AQuA" else 0) for r in rows]
        out[task] = (100.0 * sum(1.0 / k for k in ks) / len(ks) if all(ks) else None, majority)
    return out


def rank(suite: str, output_dir: Path) -> None:
    """The base model's zero-shot score without the answer format to learn: for each example, the offered
    answer whose response ``"the correct answer is <answer>"`` has the highest log-likelihood under the
    model (``lm_eval``'s multiple-choice scoring, through :class:`sora_jax.harness.SoraJaxLM`)."""
    import types

    from sora_jax import lm
    from sora_jax.harness import SoraJaxLM

    s = SUITES[suite]
    t0 = time.time()
    model = SoraJaxLM(s.model, batch_size=16, max_length=512)
    accuracy, scores, predictions = {}, {}, {}
    for task in s.tasks:
        rows = test_rows(suite, task)
        reqs = [(lm.prompt(r), f"the correct answer is {c}") for r in rows for c in choices(r)]
        ll = iter(model.loglikelihood([types.SimpleNamespace(args=q) for q in reqs], disable_tqdm=True))
        picked = []
        for r in rows:
            opts = choices(r)
            lls = [next(ll)[0] for _ in opts]
            picked.append(opts[max(range(len(opts)), key=lls.__getitem__)])
        correct = sum(p == str(r["answer"]).strip() for p, r in zip(picked, rows, strict=True))
        accuracy[task] = correct / len(rows)
        scores[task] = {"accuracy": accuracy[task], "n": len(rows), "correct": correct}
        predictions[task] = [{"answer": r["answer"], "picked": p} for r, p in zip(rows, picked, strict=True)]
        print(f"{task}: accuracy {accuracy[task]:.4f} ({correct}/{len(rows)})", flush=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    for task, preds in predictions.items():
        common.write_json_atomic(output_dir / "predictions" / f"{task}.json", preds, indent=1)
    res = {
        "config": {"suite": suite, "model": s.model, "scoring": "log-likelihood of each offered answer",
                   "max_eval_samples": s.eval_samples},
        "finished": True,
        "accuracy": accuracy,
        "average": sum(accuracy.values()) / len(accuracy),
        "scores": scores,
        "timing": {"train_wall_s": 0.0, "eval_s": time.time() - t0},
    }  # fmt: skip
    common.write_json_atomic(output_dir / "results.json", res, indent=1)


def suite_table(suite: str) -> list[str]:
    s = SUITES[suite]
    head = ["method", "trainable %", *s.tasks, "avg", "train min", "eval min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    triv = trivial(suite)
    if triv:
        for label, idx in (("uniform chance", 0), ("majority answer", 1)):
            vals = [triv[t][idx] for t in s.tasks if t in triv]
            cells = ["–" if v is None else f"{v:.1f}" for v in vals]
            avg = "–" if None in vals else f"{sum(vals) / len(vals):.1f}"
            lines.append(f"| *{label}* | – | " + " | ".join(cells) + f" | {avg} | – | – |")
    for m in s.methods:
        res = load_result(Run(suite, m))
        if res is None:
            lines.append(f"| {NAMES[m]} | " + " | ".join(["–"] * (len(head) - 1)) + " |")
            continue
        acc = res["accuracy"]
        cells = [f"{100 * acc[t]:.1f}" if t in acc else "–" for t in s.tasks]
        pct = res.get("parameters", {}).get("percent")
        timing = res.get("timing", {})
        resumed = res.get("resumed_from_step")
        train_min = f"{timing.get('train_wall_s', 0) / 60:.1f}" + (f" (from step {resumed})" if resumed else "")
        lines.append(
            f"| {NAMES[m]} | {'–' if m == 'zero_shot' or pct is None else f'{pct:.2f}'} | "
            + " | ".join(cells)
            + f" | {100 * res['average']:.1f} | {train_min} | {timing.get('eval_s', 0) / 60:.1f} |"
        )
    return lines


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's exact test on the discordant pairs): the probability, under
    ``wins ~ Binomial(wins + losses, 1/2)``, of a split at least as uneven as the one seen."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def correct_per_example(run: Run) -> dict[str, list[bool]] | None:
    """Per task, whether each kept response states the gold answer (the scorer of ``reasoning.py``); None
    without kept responses (an unfinished run, the ranked zero-shot run)."""
    from sora_jax import lm

    out = {}
    for task in SUITES[run.suite].tasks:
        f = RESULTS / run.id / "predictions" / f"{task}.json"
        if not f.exists():
            return None
        kept = json.loads(f.read_text())
        if not isinstance(kept, dict) or "responses" not in kept:
            return None
        rows = test_rows(run.suite, task)
        out[task] = [lm.is_correct(task, r, ex["answer"]) for r, ex in zip(kept["responses"], rows, strict=True)]
    return out


def paired_table(suite: str, reference: str = "lora") -> list[str]:
    """Each fine-tuned method against ``reference`` on the same examples: the examples only it gets right
    (wins), only the reference gets right (losses), and the exact sign test's p-value."""
    ref = correct_per_example(Run(suite, reference)) if load_result(Run(suite, reference)) else None
    if ref is None:
        return []
    lines = [f"| method vs {NAMES[reference]} | examples | wins | losses | difference (points) | p (exact sign test) |",
             "|---|---|---|---|---|---|"]
    for m in SUITES[suite].methods:
        if m in ("zero_shot", "zero_shot_rank", reference) or load_result(Run(suite, m)) is None:
            continue
        got = correct_per_example(Run(suite, m))
        if got is None:
            continue
        pairs = [(a, b) for t in ref for a, b in zip(got[t], ref[t], strict=True)]
        wins = sum(a and not b for a, b in pairs)
        losses = sum(b and not a for a, b in pairs)
        lines.append(f"| {NAMES[m]} | {len(pairs)} | {wins} | {losses} | {100 * (wins - losses) / len(pairs):+.1f} | "
                     f"{sign_test_p(wins, losses):.2f} |")
    return lines if len(lines) > 2 else []


PREAMBLE = """\
# The paper's decoder experiments at CPU scale

Generated by `python experiments/reasoning_study.py report` from the kept results in `results/` alone (no
training); `python experiments/reasoning_study.py run` trains what is missing, one `experiments/reasoning.py`
run at a time, resumable. Each run's `results.json` (config, timings, per-layer spectrum) and `predictions/`
(every generated response with its extracted answer) are kept. "train min" and "eval min" are the wall
minutes of the process that finished the run (a run resumed from a checkpoint: from that step on), on a
2-core machine shared with other work.

What differs from the paper: the models are SmolLM2-135M-Instruct (commonsense) and Gemma 3 270M (math),
both 4-bit GGUF files dequantised to float32 as the frozen base (as in QLoRA), instead of LLaMA3-8B and
Gemma-7B; training is 1,280 commonsense examples drawn from the four training sets that exist here (BoolQ,
ARC-e, ARC-c, OBQA; the paper: Commonsense-15k over eight tasks) and 640 GSM8K train problems (the paper:
MetaMathQA-14k), one epoch, one learning rate (2e-4), one seed; evaluation is greedy (LLM-Adapters: beam
search) on the first N examples of each test set; HellaSwag is absent (no test set here). The trivial rows
are computed on the same evaluated subsets: uniform chance over the answer vocabulary and the share of the
most frequent gold answer (a model that always gives it scores that). A response that never states an
answer in the expected vocabulary scores 0, so an untrained model can fall below chance.

The paper's numbers, for scale (different models, data and compute):

- Math, Gemma-7B on MetaMathQA-14k (the authors' repository README, best of three learning rates):

  | method | trainable % | GSM8K | MultiArith | AQuA | SVAMP | AddSub | SingleEq | avg |
  |---|---|---|---|---|---|---|---|---|
  | LoRA | 0.40 | 74.07 | 97.50 | 37.80 | 75.90 | 85.08 | 95.85 | 77.70 |
  | DoRA | 0.41 | 73.77 | 97.17 | 38.34 | 77.80 | 88.40 | 93.92 | 78.23 |
  | SORA | 0.47 | 74.98 | 98.50 | 40.49 | 76.30 | 87.63 | 95.87 | 78.96 |

- Commonsense, LLaMA3-8B on Commonsense-15k (the paper's Table 3, eight tasks, arXiv 2511.00051): Pre-Diag
  and SORA above LoRA and DoRA; for scale, DoRA's own paper reports LLaMA3-8B averages of 80.8 (LoRA) and
  85.2 (DoRA) in this protocol.

"""


def report() -> str:
    parts = []
    for suite, s in SUITES.items():
        parts += [
            f"### {suite}: `{s.model}`, {s.train_samples} training examples, first {s.eval_samples} of each test set",
            "",
            *suite_table(suite),
            "",
        ]
        paired = paired_table(suite)
        if paired:
            parts += ["Paired on the same examples (a method's wins and losses against LoRA; with these counts "
                      "only p below 0.05 is evidence of a difference):", "", *paired, ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    p, sub, r = reproduce.grid_parser(__doc__, "study", "runs/reasoning-study")
    r.add_argument("--suite", choices=sorted(SUITES), default=None, help="only this suite's runs")
    r.add_argument(
        "--method",
        action="append",
        choices=sorted({m for s in SUITES.values() for m in s.methods}),
        default=None,
        help="only this method's runs, in the order given (repeatable)",
    )
    rk = sub.add_parser("rank", help="one zero-shot run scoring the offered answers by log-likelihood")
    rk.add_argument("--suite", choices=["commonsense"], required=True)
    rk.add_argument("--output-dir", type=Path, required=True)
    rk.add_argument("--overwrite", action="store_true", help="accepted for the runner (the run is not resumable)")
    rk.add_argument("--resume", action="store_true", help="accepted for the runner (the run is not resumable)")
    sub.add_parser("report", help="print the tables and write reasoning_study/README.md from the kept results")
    args = p.parse_args(argv)
    if args.cmd == "plan":
        for run in plan():
            print(f"{'done' if load_result(run) else 'todo'}  {run.id}")
        return 0
    if args.cmd == "rank":
        rank(args.suite, args.output_dir)
        return 0
    if args.cmd == "run" and args.workers != 1:
        return reproduce.run_workers("experiments.reasoning_study", argv, args.workers)
    if args.cmd == "run":
        runs = [r for r in plan() if args.suite in (None, r.suite)]
        if args.method:
            runs = sorted((r for r in runs if r.method in args.method), key=lambda r: args.method.index(r.method))
        reproduce.train(
            runs,
            args.max_runs,
            args.keep_scratch,
            script="reasoning.py",
            results=RESULTS,
            scratch_root=SCRATCH,
            files=KEPT_FILES,
            tag="study",
        )
        return 0
    text = report()
    common.write_text_atomic(HERE / "README.md", PREAMBLE + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
