"""The ``experiments`` package: importable without path edits, every script runs as a script and as a module,
the dataclass-driven options keep the command lines and the resume fingerprints of earlier runs, and the
shared utilities (``experiments.common``) against independent references."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import common, glue, reasoning
from sora_jax.checkpoint import fingerprint

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("glue", "reasoning", "reproduce", "reasoning_study", "bench", "bench_layer", "bench_user_model")


# -- the package ---------------------------------------------------------------------------------------
def test_experiments_import_from_anywhere(tmp_path: Path):
    """``import experiments.glue`` from another directory, with nothing added to the path (the installed
    package, or PYTHONPATH as the caller set it), finds this checkout's module."""
    code = "import experiments.glue as g, experiments.reasoning as r; print(g.__file__); print(r.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(ROOT / "experiments" / "glue.py"), str(ROOT / "experiments" / "reasoning.py")]


def _help(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_runs_as_a_script(name: str, tmp_path: Path):
    out = _help([sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--help"], tmp_path)
    assert out.startswith(f"usage: {name}.py")


@pytest.mark.parametrize("name", ["glue", "reasoning"])
def test_python_dash_m_gives_the_same_command_line(name: str, tmp_path: Path):
    as_script = _help([sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--help"], tmp_path)
    as_module = _help([sys.executable, "-m", f"experiments.{name}", "--help"], tmp_path)
    assert as_module == as_script
    for heading in ("adapter:", "training:", "output and checkpoints:"):
        assert f"\n{heading}\n" in as_script, heading


def test_no_path_edits_and_no_sibling_imports():
    """No file under experiments/ or tests/ edits ``sys.path``, and no experiment imports a sibling as a
    top-level module (``import bench``): siblings come from the package (``from experiments import bench``)."""
    edits = ("sys.path." + "insert", "sys.path." + "append")
    siblings = {p.stem for p in (ROOT / "experiments").glob("*.py")}
    files = sorted((ROOT / "experiments").glob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
    assert len(files) > 10
    for path in files:
        text = path.read_text()
        for edit in edits:
            assert edit not in text, f"{path.relative_to(ROOT)} edits the path ({edit})"
        if path.parent.name != "experiments":
            continue
        for node in ast.walk(ast.parse(text)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            bad = [n for n in names if n in siblings]
            assert not bad, f"{path.relative_to(ROOT)} line {node.lineno} imports {bad} as top-level modules"


# -- the options -------------------------------------------------------------------------------------
# What the resume fingerprint left out before the options were dataclass fields (argparse namespaces minus these
# hand-kept tuples). The fields' ``trajectory`` metadata must give the same configuration, key for key and in
# order, so that a run started before still resumes.
GLUE_NON_TRAJECTORY = (
    "output_dir", "resume", "overwrite", "export_merged", "mesh", "save_every", "keep", "grid", "lrs", "seeds",
    "methods", "data_dir", "no_progress", "replicate_adapter", "compile_cache", "report_to",
)  # fmt: skip
REASONING_NON_TRAJECTORY = (
    "output_dir", "resume", "overwrite", "save_every", "keep", "no_progress", "data_dir", "compile_cache",
    "max_eval_samples", "eval_batch_size", "max_new_tokens", "tasks",
)  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--method", "lora", "--task", "rte", "--lr", "5e-4", "--scan-layers", "--remat", "full", "--no-dropout"],
        ["--method", "full", "--output-dir", "x", "--resume", "--no-progress", "--mesh", "data=1", "--keep", "3"],
        ["--grid", "--methods", "lora,sora", "--lrs", "1e-4", "--seeds", "0,1", "--report-to", "tensorboard"],
    ],
)
def test_glue_fingerprint_options_as_before(argv: list[str]):
    args = glue.parse_args(argv)
    before = {k: v for k, v in vars(args).items() if k not in GLUE_NON_TRAJECTORY}
    assert list(glue.trajectory_options(args).items()) == list(before.items())


@pytest.mark.parametrize(
    "argv",
    [
        ["--suite", "commonsense"],
        ["--suite", "math", "--method", "lora", "--tasks", "gsm8k,AQuA", "--zero-shot", "--all-linear"],
        ["--suite", "commonsense", "--max-eval-samples", "3", "--output-dir", "y", "--max-new-tokens", "8"],
    ],
)
def test_reasoning_fingerprint_options_as_before(argv: list[str]):
    args = reasoning.parse_args(argv)
    before = {k: v for k, v in vars(args).items() if k not in REASONING_NON_TRAJECTORY}
    assert list(reasoning.trajectory_options(args).items()) == list(before.items())


def test_default_fingerprints_as_before():
    """The fingerprints of the default options, as the argparse version of the scripts computed them."""
    assert fingerprint(glue.trajectory_options(glue.parse_args([]))) == "4ad3cd6dc507bf4e"
    assert fingerprint(reasoning.trajectory_options(reasoning.parse_args(["--suite", "commonsense"]))) == (
        "19d9d214a390be3f"
    )


def test_options_keep_argparse_conventions(capsys):
    """One ``--dashed`` flag per field (no ``--underscored`` alias), flags take no value, ``--no-scan-layers``
    exists, and the positive-number and choice checks give argparse's errors."""
    args = glue.parse_args(["--no-dropout", "--scan-layers", "--no-scan-layers", "--lora-alpha", "8"])
    assert args.no_dropout is True and args.scan_layers is False and args.lora_alpha == 8.0
    for argv, message in [
        (["--lora_alpha", "8"], "unrecognized arguments: --lora_alpha"),
        (["--no-dropout", "true"], "unrecognized arguments: true"),
        (["--r", "0"], "argument --r: expected a positive int, got '0'"),
        (["--method", "bogus"], "argument --method: invalid choice: 'bogus'"),
        (["--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1), got 1.0"),
    ]:
        with pytest.raises(SystemExit) as e:
            glue.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        reasoning.parse_args([])
    assert "the following arguments are required: --suite" in capsys.readouterr().err


def test_compile_cache_default_read_when_the_parser_is_built(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("SORA_JAX_COMPILE_CACHE", str(tmp_path / "a"))
    assert glue.parse_args([]).compile_cache == str(tmp_path / "a")
    monkeypatch.setenv("SORA_JAX_COMPILE_CACHE", str(tmp_path / "b"))
    assert reasoning.parse_args(["--suite", "math"]).compile_cache == str(tmp_path / "b")


# -- the shared utilities ------------------------------------------------------------------------------
def test_step_stats_match_numpy():
    """Against NumPy's percentiles (linear interpolation) of the same float64 times; exact."""
    times = np.random.default_rng(0).exponential(0.1, 37)
    st = common.step_stats(times)
    assert st == {"median_s": np.median(times), "p10_s": np.percentile(times, 10), "p90_s": np.percentile(times, 90)}
    ms = common.step_stats(times, unit="ms")
    assert ms["p90_ms"] == pytest.approx(1e3 * np.percentile(times, 90), rel=1e-12)
    assert common.step_stats([]) == {}


def test_atomic_writes(tmp_path: Path):
    path = tmp_path / "sub" / "r.json"
    common.write_json_atomic(path, {"a": np.float32(0.5), "b": np.arange(3), "p": tmp_path})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "p": str(tmp_path)}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        common.write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text())["a"] == 0.5  # the old file stands
    common.save_npz_atomic(tmp_path / "p.npz", {"x": np.ones(2)})
    assert np.load(tmp_path / "p.npz")["x"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["p.npz", "r.json", "sub"]  # no temporaries left


def test_versions_record_missing_packages_as_none():
    v = common.versions(("numpy", "no-such-package-xyz", "sora_jax"))
    assert v["numpy"] == np.__version__ and v["no-such-package-xyz"] is None and v["python"].count(".") == 2
    import sora_jax

    assert v["sora_jax"] == sora_jax.__version__
