"""``experiments/glue.py`` under faults and bad input: outputs after a crash, stale temporaries, validation
before anything is touched (tiny random BERT and MRPC rows, as in ``test_glue_cli``)."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import sora_jax.io
from tests.synthetic_glue import synthetic_glue_dir
from tests.test_glue_cli import _snapshot, glue_cli, mrpc_dir, tiny_args, tiny_model_dir  # noqa: F401


@pytest.fixture(scope="module")
def finished(glue_cli, tiny_model_dir, mrpc_dir, tmp_path_factory) -> tuple[Path, list[str]]:  # noqa: F811
    """A finished one-epoch LoRA run (with a merged export) and its arguments."""
    out = tmp_path_factory.mktemp("finished") / "run"
    argv = tiny_args(tiny_model_dir, mrpc_dir, out, "--method", "lora", "--no-progress", "--epochs", "1",
                     "--export-merged")
    assert glue_cli.main(argv) == 0
    return out, argv


def _copy(finished, tmp_path: Path) -> tuple[Path, list[str]]:
    out, argv = finished
    new = tmp_path / "run"
    shutil.copytree(out, new)
    return new, [str(new) if a == str(out) else a for a in argv]


def test_resume_of_a_finished_run_repairs_its_outputs(glue_cli, finished, tmp_path: Path):  # noqa: F811
    """A crash while ``dev_predictions.npz`` was written (truncated), or before it and the adapter were
    written (missing), after the last checkpoint: ``--resume`` writes them again, equal to the originals, and
    removes the temporaries an interrupted write left (adapter, merged export, JSON, npz)."""
    out, argv = _copy(finished, tmp_path)
    preds = dict(np.load(out / "dev_predictions.npz"))
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    with open(out / "dev_predictions.npz", "r+b") as f:
        f.truncate(100)
    with pytest.raises(zipfile.BadZipFile):
        np.load(out / "dev_predictions.npz")
    shutil.rmtree(out / "adapter")
    stale = [out / ".adapter.tmp-x1", out / ".merged.tmp-x2", out / ".merged.old-x3"]
    for d in stale:
        (d / "sub").mkdir(parents=True)
    stale += [out / ".results.json.x4", out / ".dev_predictions.npz.x5"]
    for f in stale[3:]:
        f.write_text("partial")
    assert glue_cli.main([*argv, "--resume"]) == 0
    again = dict(np.load(out / "dev_predictions.npz"))
    assert again.keys() == preds.keys()
    for k in preds:
        np.testing.assert_array_equal(again[k], preds[k])
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert json.loads((out / "results.json").read_text())["finished"] is True
    assert not [p for p in stale if p.exists()]
    assert (out / "merged" / "config.json").is_file()


def test_a_directory_replaced_again_is_never_absent(tmp_path: Path, monkeypatch):
    """Re-exporting over an existing directory: at no step is the target missing (the old form renamed the old
    directory away and the new one in: between the two renames there was none)."""
    out = tmp_path / "merged"
    sora_jax.io.atomic_directory(out, lambda t: (t / "f").write_text("old"))
    seen = []
    real = os.replace

    def watched(a, b):
        real(a, b)
        seen.append(out.is_dir())

    monkeypatch.setattr(sora_jax.io.os, "replace", watched)
    sora_jax.io.atomic_directory(out, lambda t: (seen.append(out.is_dir()), (t / "f").write_text("new")))
    assert (out / "f").read_text() == "new" and all(seen), seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_resume_with_a_lower_learning_rate_is_a_recorded_change(glue_cli, finished, capsys, tmp_path: Path):  # noqa: F811
    """The advice after a NaN stop: ``--resume --lr <lower>`` (or ``--max-grad-norm``) is accepted and recorded;
    a learning rate that is only a default (not given) still has to match."""
    out, argv = _copy(finished, tmp_path)
    no_lr = argv[: argv.index("--lr")] + argv[argv.index("--lr") + 2 :]
    assert glue_cli.main([*no_lr, "--resume"]) == 2  # the default lr 1e-3 != 5e-3: not an explicit change
    assert "lr: 0.005 -> 0.001" in capsys.readouterr().err
    lower = [*no_lr, "--lr", "1e-3", "--max-grad-norm", "1.0", "--resume"]
    assert glue_cli.main(lower) == 0
    changes = json.loads((out / "checkpoints" / "run_config.json").read_text())["changes"]
    assert changes[-1]["changed"]["train.lr"] == [0.005, 0.001]
    assert changes[-1]["changed"]["train.max_grad_norm"] == [None, 1.0]


def test_overwrite_with_a_bad_mesh_deletes_nothing(glue_cli, finished, capsys, tmp_path: Path):  # noqa: F811
    out, argv = _copy(finished, tmp_path)
    before = _snapshot(out)
    assert glue_cli.main([*argv, "--overwrite", "--mesh", "data=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glue.py: error: --mesh:") and "needs 4 devices" in err and "\n" not in err
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    ("mesh", "message"),
    [("dta=2;model", "unknown axis 'dta'"), ("data=0", "must be a positive integer"), ("data=64", "needs 64 devices")],
)
def test_bad_mesh_fails_before_loading(glue_cli, capsys, tmp_path, mesh, message, monkeypatch):  # noqa: F811
    monkeypatch.setattr(glue_cli.data, "load_split", lambda *a, **k: pytest.fail("data loaded before the check"))
    argv = tiny_args(tmp_path / "no-model", tmp_path / "no-data", tmp_path / "out", "--mesh", mesh)
    assert glue_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glue.py: error: --mesh") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_unusable_output_dir_fails_before_loading(glue_cli, capsys, tmp_path: Path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(glue_cli.data, "load_split", lambda *a, **k: pytest.fail("data loaded before the check"))
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "is a file, not a directory"),
                         (tmp_path / "file" / "sub", "is a file, not a directory")):
        assert glue_cli.main(tiny_args(tmp_path / "m", tmp_path / "d", out)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"glue.py: error: --output-dir {out}") and message in err and "\n" not in err
    # a read-only directory (permission bits do not stop root, so the probe's refusal is simulated)
    ro = tmp_path / "ro"
    ro.mkdir()

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(glue_cli.tempfile, "mkstemp", refuse)
    assert glue_cli.main(tiny_args(tmp_path / "m", tmp_path / "d", ro / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot write in {ro} (Permission denied)" in err and "\n" not in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("flag", ["--lr", "--head-lr", "--max-grad-norm"])
def test_non_finite_rates_are_refused(glue_cli, capsys, flag: str, value: str):  # noqa: F811
    with pytest.raises(SystemExit) as exc:
        glue_cli.main([f"{flag}={value}"])
    assert exc.value.code == 2
    assert f"argument {flag}: expected a positive float, got '{value}'" in capsys.readouterr().err


def _mrpc_copy(mrpc_dir: Path, tmp_path: Path) -> Path:  # noqa: F811
    root = tmp_path / "glue"
    shutil.copytree(mrpc_dir / "MRPC", root / "MRPC")
    return root


@pytest.mark.parametrize("split", ["train", "dev"])
@pytest.mark.parametrize("content", ["empty", "header", "latin1"])
def test_bad_data_files(glue_cli, capsys, tmp_path: Path, tiny_model_dir, mrpc_dir, split, content, monkeypatch):  # noqa: F811
    root = _mrpc_copy(mrpc_dir, tmp_path)
    f = root / "MRPC" / f"{split}.tsv"
    lines = f.read_bytes().split(b"\n")
    f.write_bytes({"empty": b"", "header": lines[0] + b"\n",
                   "latin1": b"\n".join([*lines[:3], lines[3].replace(b"a", b"\xe9", 1), *lines[4:]])}[content])
    monkeypatch.setattr(glue_cli.sora_jax, "load_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    assert glue_cli.main(tiny_args(tiny_model_dir, root, tmp_path / "out", "--no-progress")) == 2
    err = capsys.readouterr().err.strip()
    expect = {"empty": "is empty", "header": "has a header but no rows", "latin1": "line 4: not UTF-8 text"}[content]
    assert err.startswith(f"glue.py: error: {f}") and expect in err and "\n" not in err


@pytest.mark.parametrize("label", ["nan", "1e30", "-1"])
def test_stsb_labels_outside_the_score_range(glue_cli, capsys, tmp_path: Path, tiny_model_dir, label):  # noqa: F811
    root = synthetic_glue_dir(tmp_path / "glue", tasks=("stsb",))
    f = root / "STS-B" / "train.tsv"
    lines = f.read_text(encoding="utf-8").split("\n")
    lines[3] = "\t".join([*lines[3].split("\t")[:-1], label])
    f.write_text("\n".join(lines), encoding="utf-8")
    argv = tiny_args(tiny_model_dir, root, tmp_path / "out")
    argv[argv.index("mrpc")] = "stsb"
    assert glue_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"{f}, line 4: label '{label}' for task 'stsb' is not a finite score in [0, 5]" in err


def test_cli_resume_over_damaged_checkpoints(glue_cli, capsys, tmp_path: Path, tiny_model_dir, mrpc_dir):  # noqa: F811
    """``--resume`` on a run whose newest checkpoint is damaged warns, names the step, and finishes from the
    newest intact one with the uninterrupted run's metrics; with every checkpoint damaged it is one clear
    line and exit status 2, no traceback."""
    from tests.test_faults import _truncate_json

    out = tmp_path / "run"
    argv = tiny_args(tiny_model_dir, mrpc_dir, out, "--method", "lora", "--no-progress", "--epochs", "1",
                     "--save-every", "2", "--keep", "3")
    assert glue_cli.main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]
    capsys.readouterr()
    _truncate_json(out / "checkpoints" / "6")
    with pytest.warns(UserWarning, match=r"step 6: .*restored the newest intact step, 4"):
        assert glue_cli.main([*argv, "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["resumed_from_step"] == 4 and again["finished"] is True
    assert [h["main"] for h in again["history"]] == pytest.approx([h["main"] for h in first["history"]], abs=1e-6)
    capsys.readouterr()
    for step in (2, 4, 6):
        _truncate_json(out / "checkpoints" / str(step))
    assert glue_cli.main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glue.py: error: no intact checkpoint") and "Traceback" not in err
