"""experiments/reproduce.py: the plan grows from the pilot, finished runs are never planned again, the
paired bootstrap and its verdicts, and a report regenerated from kept results alone (every table cell
and figure), on fabricated results in a temporary folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def rep(tmp_path: Path, monkeypatch):
    from experiments import reproduce as module

    monkeypatch.setattr(module, "HERE", tmp_path / "reproduction")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "reproduction" / "results")
    return module


N_DEV = 200


def fake_run(rep, run, quality: float, rng: np.random.Generator) -> None:
    """A finished run whose dev predictions are right on a ``quality`` fraction of examples."""
    from sora_jax.data import glue as data

    task = data.get_task(run.task)
    labels = rng.integers(0, 2, N_DEV)
    right = rng.random(N_DEV) < quality
    if task.is_regression:
        labels = rng.uniform(0, 5, N_DEV)
        logits = (labels + np.where(right, 0.3, 3.0) * rng.standard_normal(N_DEV))[:, None]
    else:
        pred = np.where(right, labels, 1 - labels)
        logits = np.eye(2)[pred]
    main = float(data.compute_metrics(run.task, logits, labels)["main"])
    out = rep.RESULTS / run.id
    out.mkdir(parents=True)
    np.savez(out / "dev_predictions.npz", dev_logits=logits.astype(np.float32), dev_labels=labels)
    spectrum = {f"bert/encoder/layer_{i}/attention/self/query": {"entropy": 1.0 + i, "stable_rank": 2.0} for i in range(2)}
    res = {
        "finished": True,
        "final": {"main": main},
        "parameters": {"percent": 3.1},
        "timing": {"train_wall_s": 100.0, "eval_s": 5.0},
        "spectrum": spectrum,
    }
    (out / "results.json").write_text(json.dumps(res))


def test_plan_grows_after_the_pilot_and_skips_finished_runs(rep):
    pilot = rep.plan()
    assert [r.part for r in pilot] == ["pilot"] * 9 and rep.chosen_lrs() is None
    rng = np.random.default_rng(0)
    for run in pilot:  # the adapters' best rate is 2e-3, full fine-tuning's 5e-5
        fake_run(rep, run, {2e-3: 0.9, 5e-5: 0.9}.get(run.lr, 0.6), rng)
    assert rep.chosen_lrs() == {"adapter": 2e-3, "full": 5e-5}
    full = rep.plan()
    ids = [r.id for r in full]
    assert len(ids) == len(set(ids))
    table2 = [r for r in full if r.part == "table2"]
    cells = {rep.Run(t, m, 5e-5 if m == "full" else 2e-3, s).id for t in rep.TASKS for m in rep.METHODS for s in rep.SEEDS}
    assert cells <= set(ids)  # every cell planned once; three of them are pilot runs
    assert len(table2) == len(cells) - 3
    assert {r.lr for r in table2 if r.method == "full"} == {5e-5}
    assert {r.lr for r in table2 if r.method != "full"} == {2e-3}
    assert sum(r.part == "table6" for r in full) == len(rep.SEEDS) * (len(rep.ROTATION_RANKS) - 1)
    # the pilot's MRPC seed-0 runs at the chosen rates are Table 2 cells, already finished
    assert rep.load_result(rep.Run("mrpc", "sora", 2e-3, 0).id) is not None
    finished = [r for r in full if rep.load_result(r.id) is not None]
    assert len(finished) == 9  # the pilot, three of whose runs are Table 2 cells
    assert rep.train(finished, max_runs=None, keep_scratch=False) == 0  # finished runs never train again


def test_train_runs_each_run_as_a_module_of_this_checkout(rep, tmp_path: Path, monkeypatch):
    """Each run is ``python -m experiments.<script>`` in the repository root (this checkout's code, installed or
    not); its kept files are copied once it finishes."""
    calls = []

    def fake_subprocess_run(argv, cwd):
        calls.append((argv, cwd))
        out = Path(argv[argv.index("--output-dir") + 1])
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps({"finished": True}))
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(rep.subprocess, "run", fake_subprocess_run)
    run = rep.Run("mrpc", "lora", 1e-3, 0)
    assert rep.train([run], None, False, results=tmp_path / "kept", scratch_root=tmp_path / "scratch") == 1
    (argv, cwd), = calls
    assert argv[:3] == [sys.executable, "-m", "experiments.glue"] and argv[-1] == "--overwrite" and cwd == ROOT
    assert rep.load_result(run.id, tmp_path / "kept") == {"finished": True}
    assert not (tmp_path / "scratch" / run.id).exists()  # scratch removed once kept


def test_concurrent_run_processes_share_the_grid(rep, tmp_path: Path, monkeypatch):
    """A run another process is training (its lock held, here by a child process) is skipped, not trained
    twice; the next unfinished run trains; once the holder exits, the run is claimable again."""
    trained = []

    def fake_subprocess_run(argv, cwd):
        out = Path(argv[argv.index("--output-dir") + 1])
        trained.append(out.name)
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps({"finished": True}))
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(rep.subprocess, "run", fake_subprocess_run)
    scratch, kept = tmp_path / "scratch", tmp_path / "kept"
    busy, free = rep.Run("rte", "lora", 1e-3, 0), rep.Run("rte", "sora", 1e-3, 0)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(scratch / f".{busy.id}.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert rep.train([busy, free], None, False, results=kept, scratch_root=scratch) == 1
        assert trained == [free.id] and rep.load_result(busy.id, kept) is None
    finally:
        holder.kill()
        holder.wait()
    assert rep.train([busy, free], None, False, results=kept, scratch_root=scratch) == 1
    assert trained == [free.id, busy.id]


def test_workers_split_the_cores_and_each_runs_the_grid(rep, monkeypatch):
    """``run --workers 2`` starts two ``run`` processes of this checkout, each pinned to its own contiguous share
    of the cores, and returns the first failure's status; more workers than cores is one clear error."""
    assert rep.core_shares({4, 0, 2, 1, 3}, 2) == [[0, 1, 2], [3, 4]] and rep.core_shares({0, 1}, 2) == [[0], [1]]
    for bad in (0, 3):
        with pytest.raises(SystemExit, match="--workers must be between 1 and the 2 cores"):
            rep.core_shares({0, 1}, bad)
    started = []

    class FakeProcess:
        def __init__(self, argv, cwd, preexec_fn):
            started.append((argv, cwd, preexec_fn))

        def wait(self):
            return 3 if len(started) == 2 and self is procs[1] else 0

    procs = []
    monkeypatch.setattr(rep.subprocess, "Popen", lambda *a, **kw: procs.append(FakeProcess(*a, **kw)) or procs[-1])
    monkeypatch.setattr(rep.os, "sched_getaffinity", lambda pid: {0, 1})
    assert rep.main(["run", "--workers", "2", "--max-runs", "4"]) == 3  # the second worker's failure
    assert len(started) == 2
    for (argv, cwd, pin), cores in zip(started, ([0], [1]), strict=True):
        assert argv == [sys.executable, "-m", "experiments.reproduce", "run", "--workers", "2", "--max-runs", "4",
                        "--workers", "1"] and cwd == ROOT
        assert pin.func is rep.os.sched_setaffinity and pin.args == (0, cores)


HOLD_LOCK = """
import fcntl, pathlib, sys, time
p = pathlib.Path(sys.argv[1]); p.parent.mkdir(parents=True, exist_ok=True)
f = open(p, "w"); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print("locked", flush=True); time.sleep(600)
"""


def test_paired_bootstrap_verdicts(rep):
    rng = np.random.default_rng(1)
    better, worse, same = [], [], []
    for s in range(3):
        a, b, c = (rep.Run("rte", m, 1e-3, s) for m in ("sora", "lora", "dora"))
        fake_run(rep, a, 0.85, rng)
        fake_run(rep, b, 0.60, rng)
        fake_run(rep, c, 0.60, rng)
        better.append((a.id, b.id))
        worse.append((b.id, a.id))
        same.append((b.id, b.id))
    up = rep.paired_bootstrap({"rte": better}, n_boot=200)
    assert 15 < up["diff"] < 35 and up["lo"] > 0 and rep.verdict(up) == "reproduced"
    down = rep.paired_bootstrap({"rte": worse}, n_boot=200)
    assert down["hi"] < 0 and rep.verdict(down).startswith("not reproduced")
    tie = rep.paired_bootstrap({"rte": same}, n_boot=50)
    assert tie["lo"] == tie["hi"] == 0 and rep.verdict(tie) == "inconclusive at this scale"


def test_cells_state_a_spread_only_with_two_seeds_or_more(rep):
    assert rep.fmt([]) == "–" and rep.fmt([58.48]) == "58.48 (1)"
    assert rep.fmt([1.0, 3.0]) == "2.00 ± 1.41 (2)"  # sample standard deviation


def test_run_time_counts_the_cores_each_run_had():
    from experiments import reproduce

    timing = {"timing": {"train_wall_s": 100.0, "eval_s": 5.0}}
    # a run on one core, and one kept before the count was recorded (it had both of this CPU's cores)
    assert reproduce.run_time([{**timing, "cpu_count": 1}, timing]) == (210.0, 315.0)


def test_report_from_kept_results_alone(rep):
    rng = np.random.default_rng(2)
    for run in rep.plan():
        fake_run(rep, run, 0.8, rng)
    plan = rep.plan()
    for run in plan:
        if rep.load_result(run.id) is None:
            fake_run(rep, run, 0.85 if run.method == "sora" else 0.8, rng)
    assert all(rep.load_result(r.id) for r in rep.plan())
    text = rep.report(n_boot=100)
    assert (rep.HERE / "README.md").read_text() == text
    assert f"Finished runs: {len(plan)} of {len(plan)} planned" in text
    table2 = text.split("## Table 2")[1].split("##")[0]
    for name in rep.NAMES.values():
        row = next(line for line in table2.splitlines() if line.startswith(f"| {name} |"))
        ours = row.rsplit("|", 2)[0]  # the last column is the paper's average (none for full fine-tuning)
        assert "–" not in ours and ours.count("(3)") == len(rep.TASKS), row
    claims = text.split("## Claims")[1].split("##")[0]
    assert "not yet run" not in claims and claims.count("| 4 x 3 |") == 6
    assert "Claim r_p 16 > r_p 1 on RTE" in text and "not yet run" not in text.split("## Table 6")[1]
    for t in rep.TASKS:
        assert (rep.HERE / "figures" / f"spectrum-{t}.png").stat().st_size > 1000
