"""The paper's GLUE comparisons on the real ``minilm`` encoder, on a CPU: one resumable grid of
``glue.py`` runs and a report regenerated from the kept results alone.

    python experiments/reproduce.py plan                 # every run, and which are done
    python experiments/reproduce.py run --max-runs 4     # the next 4 unfinished runs (resumable; Ctrl-C safe)
    python experiments/reproduce.py report               # tables, statistics, verdicts and PNGs; no training

The grid (SPEC section 5's protocol where a CPU allows it: r 16, r_p 1, batch 32, 5 epochs, max length
128, AdamW with 6 % warm-up then linear decay):

- ``pilot``: MRPC, seed 0, LoRA and SORA at lr {5e-4, 1e-3, 2e-3}, full fine-tuning at {2e-5, 5e-5,
  1e-4}. The adapter methods share the rate with the best mean final-epoch score of LoRA and SORA; full
  fine-tuning takes its own best (the paper searched three rates per method).
- ``table2`` (the paper's Tables 2 and 5): RTE, MRPC, STS-B, CoLA x {full, LoRA, DoRA, Pre-Diag, SORA,
  Pre-Ortho, Post-Ortho} x seeds {0, 1, 2} at the pilot's rates.
- ``table6``: SORA with r_p in {1, 2, 4, 8, 16} on RTE, seeds {0, 1, 2}.

Each run trains in ``runs/reproduce/<id>`` (checkpoints: a killed run resumes there) and, once finished,
its ``results.json``, ``metrics.jsonl`` and ``dev_predictions.npz`` (final-epoch dev logits, for the
bootstrap) are copied to ``experiments/reproduction/results/<id>/``, which the repository keeps. A run
whose kept ``results.json`` says ``finished`` is never trained again. The report reads only that folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "experiments" / "reproduction"
RESULTS = HERE / "results"
SCRATCH = ROOT / "runs" / "reproduce"
KEPT_FILES = ("results.json", "metrics.jsonl", "dev_predictions.npz")

TASKS = ("rte", "mrpc", "stsb", "cola")
METHODS = ("full", "lora", "dora", "prediag", "sora", "pre_ortho", "post_ortho")
SEEDS = (0, 1, 2)
ROTATION_RANKS = (1, 2, 4, 8, 16)
EPOCHS = 5
PILOT_TASK = "mrpc"
PILOT_LRS = {"adapter": (5e-4, 1e-3, 2e-3), "full": (2e-5, 5e-5, 1e-4)}
PILOT_METHODS = {"adapter": ("lora", "sora"), "full": ("full",)}
NAMES = {
    "full": "Full FT",
    "lora": "LoRA",
    "dora": "DoRA",
    "prediag": "Pre-Diag",
    "sora": "SORA",
    "pre_ortho": "Pre-Ortho",
    "post_ortho": "Post-Ortho",
}
# the paper's numbers (DeBERTa-v3-base, GLUE average over 7 tasks; Table 6: RTE by r_p); SPEC section 5
PAPER_AVG = {"lora": 88.57, "dora": 88.84, "prediag": 88.98, "sora": 89.19, "pre_ortho": 87.76, "post_ortho": 88.93}
PAPER_RTE_RP = {1: 87.90, 2: 87.72, 4: 88.44, 8: 88.44, 16: 89.53}


def family(method: str) -> str:
    return "full" if method == "full" else "adapter"


@dataclasses.dataclass(frozen=True)
class Run:
    """One ``glue.py`` run of the grid."""

    task: str
    method: str
    lr: float
    seed: int
    rotation_rank: int = 1
    part: str = "table2"

    @property
    def id(self) -> str:
        return f"{self.task}-{self.method}-lr{self.lr:g}-rp{self.rotation_rank}-s{self.seed}"

    def argv(self, output_dir: Path) -> list[str]:
        return [
            "--task", self.task,
            "--method", self.method,
            "--lr", f"{self.lr:g}",
            "--head-lr", f"{self.lr:g}",
            "--seed", str(self.seed),
            "--rotation-rank", str(self.rotation_rank),
            "--epochs", str(EPOCHS),
            "--output-dir", str(output_dir),
            "--no-progress",
        ]  # fmt: skip


# -- kept results ------------------------------------------------------------------------------------
def load_result(run_id: str, root: Path = RESULTS) -> dict[str, Any] | None:
    """The kept ``results.json`` of a finished run, else ``None``."""
    path = root / run_id / "results.json"
    if not path.exists():
        return None
    try:
        res = json.loads(path.read_text())
    except ValueError:
        return None
    return res if res.get("finished") else None


def final_score(res: dict[str, Any]) -> float:
    """The final epoch's main dev metric (the task's GLUE score), x 100."""
    return 100.0 * float(res["final"]["main"])


# -- the plan ----------------------------------------------------------------------------------------
def pilot_runs() -> list[Run]:
    return [
        Run(PILOT_TASK, m, lr, 0, part="pilot")
        for fam, lrs in PILOT_LRS.items()
        for m in PILOT_METHODS[fam]
        for lr in lrs
    ]


def chosen_lrs(root: Path = RESULTS) -> dict[str, float] | None:
    """Per family the pilot's best rate (mean final-epoch score over the family's pilot methods), or
    ``None`` while a pilot run is unfinished."""
    out = {}
    for fam, lrs in PILOT_LRS.items():
        means = {}
        for lr in lrs:
            scores = [load_result(Run(PILOT_TASK, m, lr, 0).id, root) for m in PILOT_METHODS[fam]]
            if any(s is None for s in scores):
                return None
            means[lr] = float(np.mean([final_score(s) for s in scores]))
        out[fam] = max(means, key=means.get)
    return out


def plan(root: Path = RESULTS) -> list[Run]:
    """Every run, in the order they are trained: the pilot, then Table 2 seed by seed (a full table
    with one seed comes first), then Table 6. Until the pilot is finished, only the pilot is planned."""
    runs = pilot_runs()
    lrs = chosen_lrs(root)
    if lrs is None:
        return runs
    for seed in SEEDS:
        runs += [Run(t, m, lrs[family(m)], seed) for t in TASKS for m in METHODS]
    runs += [
        Run("rte", "sora", lrs["adapter"], seed, rp, part="table6") for seed in SEEDS for rp in ROTATION_RANKS[1:]
    ]
    seen: set[str] = set()
    return [r for r in runs if not (r.id in seen or seen.add(r.id))]


def keep(run: Run, scratch: Path) -> None:
    """Copy a finished run's small outputs into the kept results, atomically (a folder renamed into place)."""
    dest = RESULTS / run.id
    tmp = RESULTS / f".{run.id}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in KEPT_FILES:
        if (scratch / name).exists():
            shutil.copy2(scratch / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def train(runs: Iterable[Run], max_runs: int | None, keep_scratch: bool) -> int:
    """Train the unfinished runs in order (each in its own ``glue.py`` process); returns how many ran."""
    done = 0
    for run in runs:
        if load_result(run.id) is not None:
            continue
        if max_runs is not None and done >= max_runs:
            break
        scratch = SCRATCH / run.id
        argv = [sys.executable, str(ROOT / "experiments" / "glue.py"), *run.argv(scratch)]
        if (scratch / "checkpoints").exists() and any((scratch / "checkpoints").iterdir()):
            argv.append("--resume")
        else:
            argv.append("--overwrite")
        print(f"[reproduce] {run.part} {run.id}: {' '.join(argv[1:])}", flush=True)
        t0 = time.time()
        proc = subprocess.run(argv, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"[reproduce] {run.id} failed (exit {proc.returncode}); its run directory is {scratch}")
        keep(run, scratch)
        if not keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"[reproduce] {run.id} done in {time.time() - t0:.0f} s", flush=True)
        done += 1
    return done


# -- statistics --------------------------------------------------------------------------------------
def metric_fn(task: str):
    from sora_jax.data import glue as data

    def score(logits: np.ndarray, labels: np.ndarray) -> float:
        return 100.0 * float(data.compute_metrics(task, logits, labels)["main"])

    return score


def predictions(run_id: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(RESULTS / run_id / "dev_predictions.npz") as z:
        split = next(k[: -len("_logits")] for k in z.files if k.endswith("_logits"))
        return z[f"{split}_logits"], z[f"{split}_labels"]


def paired_bootstrap(
    pairs: dict[str, list[tuple[str, str]]], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Mean over tasks of ``mean over seeds (score(a) - score(b))`` and its 95 % percentile interval.

    ``pairs``: ``{task: [(run_a, run_b), ...]}``, one pair per seed (same seed, same dev set). Each
    bootstrap replicate resamples, per task, the seeds (pairs) and the dev examples with replacement
    (the same examples for both runs of a pair), so the interval covers seed-to-seed and test-set
    variation."""
    rng = np.random.default_rng(seed)
    point, reps = [], np.zeros((n_boot, len(pairs)))
    for j, (task, runs) in enumerate(pairs.items()):
        score = metric_fn(task)
        preds = [(predictions(a), predictions(b)) for a, b in runs]
        point.append(np.mean([score(*pa) - score(*pb) for pa, pb in preds]))
        n = len(preds[0][0][1])
        for i in range(n_boot):
            chosen = rng.integers(0, len(preds), len(preds))
            idx = rng.integers(0, n, n)
            diffs = [
                score(preds[k][0][0][idx], preds[k][0][1][idx]) - score(preds[k][1][0][idx], preds[k][1][1][idx])
                for k in chosen
            ]
            reps[i, j] = np.mean(diffs)
    avg = reps.mean(axis=1)
    lo, hi = np.nanpercentile(avg, [2.5, 97.5])
    return {"diff": float(np.mean(point)), "lo": float(lo), "hi": float(hi), "per_task": dict(zip(pairs, point, strict=True))}


def verdict(ci: dict[str, Any]) -> str:
    if ci["lo"] > 0:
        return "reproduced"
    if ci["hi"] < 0:
        return "not reproduced (reversed)"
    return "inconclusive at this scale"


# -- the report --------------------------------------------------------------------------------------
def table2_results(lrs: dict[str, float]) -> dict[str, dict[str, list[dict]]]:
    out: dict[str, dict[str, list[dict]]] = {}
    for m in METHODS:
        for t in TASKS:
            for s in SEEDS:
                res = load_result(Run(t, m, lrs[family(m)], s).id)
                if res is not None:
                    out.setdefault(m, {}).setdefault(t, []).append(res)
    return out


def fmt(values: Sequence[float]) -> str:
    if not values:
        return "–"
    v = np.asarray(values, np.float64)
    std = v.std(ddof=1) if v.size > 1 else 0.0
    return f"{v.mean():.2f} ± {std:.2f} ({v.size})"


def pilot_table() -> list[str]:
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in PILOT_LRS["adapter"]) + " |", "|---|---|---|---|"]
    for fam, methods in PILOT_METHODS.items():
        for m in methods:
            cells = []
            for lr in PILOT_LRS[fam]:
                res = load_result(Run(PILOT_TASK, m, lr, 0).id)
                cells.append(f"{lr:g}: {final_score(res):.2f}" if res else f"{lr:g}: –")
            lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    return lines


def report(n_boot: int = 1000) -> str:
    """Write ``experiments/reproduction/report.md`` and the PNGs from the kept results; returns the text."""
    lrs = chosen_lrs()
    lines = ["# sora-jax reproduction report (generated by `python experiments/reproduce.py report`)", ""]
    finished = sorted(p.parent.name for p in RESULTS.glob("*/results.json") if load_result(p.parent.name))
    cpu_s = sum(
        (load_result(r) or {}).get("timing", {}).get("train_wall_s", 0.0)
        + (load_result(r) or {}).get("timing", {}).get("eval_s", 0.0)
        for r in finished
    )
    total = len(plan())
    lines += [f"Finished runs: {len(finished)} of {total} planned; training + evaluation wall time "
              f"{cpu_s / 3600:.2f} h on a 2-core CPU.", ""]  # fmt: skip
    lines += ["## Learning-rate pilot (MRPC dev, final epoch, seed 0)", "", *pilot_table(), ""]
    if lrs is None:
        lines.append("The pilot is not finished: no rate is chosen and no other run is planned yet.")
        text = "\n".join(lines) + "\n"
        _write(HERE / "report.md", text)
        return text
    lines += [f"Chosen: adapters lr {lrs['adapter']:g}, full fine-tuning lr {lrs['full']:g}.", ""]
    by = table2_results(lrs)
    lines += ["## Table 2 / Table 5 analogue (minilm, dev, final epoch; mean ± std (seeds))", ""]
    lines.append("| method | trainable % | " + " | ".join(t.upper() for t in TASKS) + " | avg | paper avg |")
    lines.append("|---|---|" + "---|" * (len(TASKS) + 2))
    for m in METHODS:
        runs = by.get(m, {})
        pct = next((r["parameters"]["percent"] for rs in runs.values() for r in rs), float("nan"))
        cells = [fmt([final_score(r) for r in runs.get(t, [])]) for t in TASKS]
        complete = all(len(runs.get(t, [])) > 0 for t in TASKS)
        avg = np.mean([np.mean([final_score(r) for r in runs[t]]) for t in TASKS]) if complete else None
        paper = PAPER_AVG.get(m)
        lines.append(
            f"| {NAMES[m]} | {pct:.2f} | " + " | ".join(cells)
            + f" | {'–' if avg is None else f'{avg:.2f}'} | {'–' if paper is None else paper} |"
        )
    lines.append("")
    lines += trivial_baselines()
    claims = [
        ("DoRA > LoRA", "dora", "lora", PAPER_AVG["dora"] - PAPER_AVG["lora"]),
        ("Pre-Diag > LoRA", "prediag", "lora", PAPER_AVG["prediag"] - PAPER_AVG["lora"]),
        ("SORA > LoRA", "sora", "lora", PAPER_AVG["sora"] - PAPER_AVG["lora"]),
        ("SORA > DoRA", "sora", "dora", PAPER_AVG["sora"] - PAPER_AVG["dora"]),
        ("SORA > Pre-Diag (the rotation adds)", "sora", "prediag", PAPER_AVG["sora"] - PAPER_AVG["prediag"]),
        ("Post-Ortho > Pre-Ortho", "post_ortho", "pre_ortho", PAPER_AVG["post_ortho"] - PAPER_AVG["pre_ortho"]),
    ]
    lines += ["## Claims: paired differences (95 % bootstrap interval over seeds and dev examples)", ""]
    lines += ["| claim | paper (avg points) | ours (avg points) [95 % CI] | tasks x seeds | verdict |", "|---|---|---|---|---|"]
    for name, a, b, paper in claims:
        pairs = {}
        for t in TASKS:
            ps = [
                (Run(t, a, lrs[family(a)], s).id, Run(t, b, lrs[family(b)], s).id)
                for s in SEEDS
                if load_result(Run(t, a, lrs[family(a)], s).id) and load_result(Run(t, b, lrs[family(b)], s).id)
            ]
            if ps:
                pairs[t] = ps
        if len(pairs) < len(TASKS) or min(len(v) for v in pairs.values()) < 3:
            have = sum(len(v) for v in pairs.values())
            lines.append(f"| {name} | +{paper:.2f} | – | {have} pairs (needs 3 seeds on every task) | not yet run |")
            continue
        ci = paired_bootstrap(pairs, n_boot)
        lines.append(
            f"| {name} | +{paper:.2f} | {ci['diff']:+.2f} [{ci['lo']:+.2f}, {ci['hi']:+.2f}] | "
            f"{len(pairs)} x {min(len(v) for v in pairs.values())} | {verdict(ci)} |"
        )
    lines.append("")
    lines += table6(lrs, n_boot)
    figures = spectrum_figures(lrs)
    if figures:
        lines += ["## Update spectra (Figs. 1a/1b and 4 analogue; seed 0)", ""]
        lines += [f"![{f.stem}](figures/{f.name})" for f in figures]
        lines.append("")
    lines += speed_table()
    text = "\n".join(lines) + "\n"
    _write(HERE / "report.md", text)
    return text


def trivial_baselines() -> list[str]:
    """Majority class (classification) or the training mean (regression) on each task's dev set."""
    from sora_jax.data import glue as data

    data_dir = data.find_data_dir()
    cells = []
    for t in TASKS:
        try:
            train_split = data.load_split(t, "train", data_dir)
            dev = data.load_split(t, data.get_task(t).dev_splits[0], data_dir)
        except Exception as e:  # noqa: BLE001 - the report still renders without data
            cells.append(f"– ({type(e).__name__})")
            continue
        labels = np.asarray(dev.labels)
        spec = data.get_task(t)
        if spec.is_regression:
            pred = np.full((len(labels), 1), float(np.mean(train_split.labels)))
            pred[0, 0] += 1e-6  # a constant has no correlation; the tiny jitter makes it defined (about 0)
        else:
            majority = np.bincount(np.asarray(train_split.labels)).argmax()
            pred = np.eye(spec.num_labels)[np.full(len(labels), majority)]
        cells.append(f"{100 * data.compute_metrics(t, pred, labels)['main']:.2f}")
    return [
        "Trivial baselines on the same dev sets (majority class of the training set; for STS-B a constant",
        "prediction, whose correlation is 0):",
        "",
        "| baseline | " + " | ".join(t.upper() for t in TASKS) + " |",
        "|---|" + "---|" * len(TASKS),
        "| trivial | " + " | ".join(cells) + " |",
        "",
    ]


def table6(lrs: dict[str, float], n_boot: int) -> list[str]:
    lines = ["## Table 6 analogue: SORA on RTE by rotation rank r_p (final epoch, mean ± std (seeds))", ""]
    lines += ["| r_p | trainable % | RTE | paper |", "|---|---|---|---|"]
    for rp in ROTATION_RANKS:
        res = [load_result(Run("rte", "sora", lrs["adapter"], s, rp).id) for s in SEEDS]
        res = [r for r in res if r]
        pct = f"{res[0]['parameters']['percent']:.2f}" if res else "–"
        lines.append(f"| {rp} | {pct} | {fmt([final_score(r) for r in res])} | {PAPER_RTE_RP[rp]} |")
    pairs = [
        (Run("rte", "sora", lrs["adapter"], s, 16).id, Run("rte", "sora", lrs["adapter"], s, 1).id)
        for s in SEEDS
        if load_result(Run("rte", "sora", lrs["adapter"], s, 16).id)
        and load_result(Run("rte", "sora", lrs["adapter"], s, 1).id)
    ]
    lines.append("")
    if len(pairs) == len(SEEDS):
        ci = paired_bootstrap({"rte": pairs}, n_boot)
        lines.append(
            f"Claim r_p 16 > r_p 1 on RTE (paper +{PAPER_RTE_RP[16] - PAPER_RTE_RP[1]:.2f}): ours "
            f"{ci['diff']:+.2f} [{ci['lo']:+.2f}, {ci['hi']:+.2f}], {verdict(ci)}."
        )
    else:
        lines.append(f"Claim r_p 16 > r_p 1 on RTE: not yet run ({len(pairs)} of {len(SEEDS)} seed pairs).")
    return [*lines, ""]


def spectrum_figures(lrs: dict[str, float]) -> list[Path]:
    """Per task, per-layer SVD entropy and stable rank of Delta W (seed 0) for Full FT, LoRA, DoRA,
    Pre-Diag and SORA: ``figures/spectrum-<task>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for t in TASKS:
        series = {}
        for m in ("full", "lora", "dora", "prediag", "sora"):
            res = load_result(Run(t, m, lrs[family(m)], 0).id)
            if res and res.get("spectrum"):
                series[m] = res["spectrum"]
        if not series:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        for m, spec in series.items():
            layers = sorted(spec, key=_layer_order)
            for ax, key in zip(axes, ("entropy", "stable_rank"), strict=True):
                ax.plot(range(len(layers)), [spec[p][key] for p in layers], marker=".", label=NAMES[m])
        for ax, key in zip(axes, ("SVD entropy of ΔW", "stable rank of ΔW"), strict=True):
            ax.set_xlabel("adapted layer (block-major: attention out, key, query, value, FFN in, FFN out)")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{t.upper()}: update spectrum per layer (minilm, seed 0)")
        fig.tight_layout()
        path = HERE / "figures" / f"spectrum-{t}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        out.append(path)
    return out


def _layer_order(path: str) -> tuple:
    parts = path.split("/")
    block = next((int(p.split("_")[-1]) for p in parts if p.startswith("layer_")), -1)
    return (block, path)


def speed_table() -> list[str]:
    """Fig. 5 analogue from ``experiments/results/bench-minilm.json`` (``experiments/bench.py --peft``)."""
    path = ROOT / "experiments" / "results" / "bench-minilm.json"
    if not path.exists():
        return []
    bench = json.loads(path.read_text())
    res = bench["results"]

    def median(key: str) -> str:
        r = res.get(key)
        return f"{r['median_s']:.3f}" if isinstance(r, dict) and "median_s" in r else "–"

    lines = [
        "## Fig. 5 analogue: training and inference time per method (minilm, 32 x 128, 2-core CPU)",
        "",
        f"From `{bench['command']}` ({bench['date'][:10]}); medians in seconds per step. The paper measured",
        "LLaMA3-8B on accelerators; these are a 22.7 M-parameter encoder on a CPU.",
        "",
        "| method | sora-jax train | PyTorch train | sora-jax inference, unmerged | merged |",
        "|---|---|---|---|---|",
    ]
    torch_key = {"lora": "peft_lora", "dora": "peft_dora", "prediag": "torch_prediag", "sora": "torch_sora"}
    for m in ("lora", "dora", "prediag", "sora", "pre_ortho", "post_ortho"):
        lines.append(
            f"| {NAMES[m]} | {median(f'jax/train/{m}/activation')} | {median(f'torch/train/{torch_key.get(m)}')} | "
            f"{median(f'jax/infer/{m}/activation')} | {median(f'jax/infer/{m}/merged')} |"
        )
    return [*lines, ""]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the next unfinished runs of the grid")
    r.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (default: all)")
    r.add_argument("--keep-scratch", action="store_true", help="keep runs/reproduce/<id> after a run is kept")
    sub.add_parser("plan", help="list every planned run and whether it is finished")
    rep = sub.add_parser("report", help="regenerate report.md and the figures from the kept results")
    rep.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates")
    args = p.parse_args(argv)
    if args.cmd == "plan":
        for run in plan():
            print(f"{'done' if load_result(run.id) else 'todo'}  {run.part:7s} {run.id}")
        return 0
    if args.cmd == "run":
        while True:  # the plan grows once the pilot is finished
            before = len(plan())
            ran = train(plan(), args.max_runs, args.keep_scratch)
            if args.max_runs is not None:
                args.max_runs -= ran
            if len(plan()) == before or (args.max_runs is not None and args.max_runs <= 0):
                return 0
    print(report(args.bootstrap))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
