"""``experiments/glue.py`` end to end on a tiny random BERT, and its handling of bad input.

The model: a ``transformers`` BERT (hidden 32, 2 layers) saved with ``save_pretrained`` beside a
character-level WordPiece vocabulary (so any English text tokenises without [UNK]). The data: the
first rows of MRPC from the shared GLUE copy when present, else ``synthetic_glue_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from sora_jax.data import glue as data
from tests.synthetic_glue import synthetic_glue_dir

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "glue.py"
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
PUNCT = ".,'\"!?-&;:()$%/"


@pytest.fixture(scope="module")
def glue_cli():
    from experiments import glue

    return glue


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARS, *PUNCT, *(f"##{c}" for c in CHARS + PUNCT)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer(str(path / "vocab.txt"), do_lower_case=True)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def mrpc_dir(tmp_path_factory) -> Path:
    """A GLUE root with MRPC: the shared real copy, else a synthetic one."""
    real = data.find_data_dir()
    if real is not None and (Path(real) / "MRPC" / "train.tsv").is_file():
        return Path(real)
    return synthetic_glue_dir(tmp_path_factory.mktemp("glue"), tasks=("mrpc",))


def tiny_args(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--task", "mrpc", "--data-dir", str(data_dir), "--max-train-samples", "48",
        "--max-eval-samples", "24", "--epochs", "2", "--batch-size", "8", "--max-length", "32", "--lr", "5e-3",
        "--output-dir", str(out), *extra,
    ]  # fmt: skip


def test_end_to_end_results_and_merged_export(tmp_path: Path, tiny_model_dir: Path, mrpc_dir: Path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(SCRIPT),
        *tiny_args(tiny_model_dir, mrpc_dir, out, "--method", "sora", "--export-merged", "--save-every", "4"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "loss=" in proc.stderr and "ex_s=" in proc.stderr  # the progress bar
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] is True
    assert res["config"]["method"] == "sora" and res["config"]["adapter"]["r"] == 16
    assert res["steps_per_epoch"] == 6 and res["total_steps"] == 12
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    for h in res["history"]:
        assert {"train_loss", "f1", "accuracy", "main"} <= set(h)
        assert 0.0 <= h["accuracy"] <= 1.0 and np.isfinite(h["train_loss"])
    assert res["best"]["value"] == max(h["main"] for h in res["history"])
    assert res["best"]["metric"] == "f1_accuracy_mean"
    # 6 targets x 2 layers; trainable = adapter + classifier (SORA: r (d_in + d_out) + d_out + 2 d_out)
    assert len(res["spectrum"]) == 12
    assert all(set(v) == {"entropy", "effective_rank", "stable_rank"} for v in res["spectrum"].values())
    per_layer = lambda d_in, d_out: 16 * (d_in + d_out) + 3 * d_out  # noqa: E731
    adapter_n = 2 * (4 * per_layer(32, 32) + per_layer(32, 64) + per_layer(64, 32))
    # the head: the classifier and the pooler (dense 32 x 32 + bias), trained in full by default
    assert res["parameters"]["trainable"] == adapter_n + 32 * 2 + 2 + 32 * 32 + 32
    assert res["config"]["adapter"]["modules_to_save"] == ["classifier", "pooler"]
    assert 0 < res["parameters"]["percent"] < 100
    assert {"median_s", "p10_s", "p90_s", "compile_s"} <= set(res["timing"])
    assert f"of it compiling {res['timing']['compile_s']:.1f} s" in proc.stdout  # the summary line
    jc = res["timing"]["jax_compile"]
    assert jc["trace_s"] > 0 and jc["backend_s"] > 0 and jc["total_s"] == pytest.approx(sum(
        jc[k] for k in ("trace_s", "lower_s", "backend_s")))
    assert f"JAX compile time {jc['total_s']:.1f} s" in proc.stdout
    # per-step metrics as they happened: one line per optimizer step, one per evaluation
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all(np.isfinite(r["loss"]) and r["examples_per_s"] > 0 for r in steps)
    assert steps[0]["lr"] == 0.0 and max(r["lr"] for r in steps) == pytest.approx(5e-3)  # warm-up, then decay
    evals = [r for r in log if "eval" in r]
    assert [(r["step"], r["epoch"]) for r in evals] == [(6, 1), (12, 2)]
    assert evals[-1]["eval"]["main"] == res["history"][-1]["main"]
    assert res["versions"]["jax"] and res["devices"] and res["cpu_count"] == len(os.sched_getaffinity(0))
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["12", "8"]

    # the merged export loads in transformers and reproduces our dev logits (activation path, unmerged);
    # tolerance 1e-4: float32 merge vs factored computation through a 2-layer model
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "merged")).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out / "merged"))
    dev = data.load_split("mrpc", "dev", mrpc_dir, 24)
    batches = data.epoch_batches(data.encode(tokenizer, dev, 32), 8, seed=0, epoch=0, shuffle=False)
    ours = np.load(out / "dev_predictions.npz")
    theirs = np.zeros_like(ours["dev_logits"])
    for b in batches:
        keep = b["weights"] > 0
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor(b["input_ids"], dtype=torch.long),
                attention_mask=torch.tensor(b["attention_mask"], dtype=torch.long),
                token_type_ids=torch.tensor(b["token_type_ids"], dtype=torch.long),
            ).logits.numpy()
        theirs[b["index"][keep]] = logits[keep]
    np.testing.assert_allclose(theirs, ours["dev_logits"], atol=1e-4)
    np.testing.assert_array_equal(ours["dev_labels"], dev.labels)
    # the export differs from the initial model: training changed it
    init = transformers.AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir))
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(model.state_dict()[q], init.state_dict()[q])


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "foo"], "argument --task: invalid choice: 'foo'"),
        (["--method", "bar"], "argument --method: invalid choice: 'bar'"),
        (["--grid", "--methods", "lora,nope"], "unknown method(s) ['nope']"),
        (["--lrs", "1e-4"], "--methods/--lrs/--seeds only apply with --grid"),
        (["--batch-size", "30", "--grad-accum", "4"], "--batch-size 30 must be a multiple of --grad-accum 4"),
        (["--r", "0"], "expected a positive int, got '0'"),
    ],
)
def test_bad_arguments(glue_cli, capsys, argv: list[str], message: str):
    with pytest.raises(SystemExit) as exc:
        glue_cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_data_dir_without_task_files(glue_cli, capsys, tmp_path: Path, tiny_model_dir: Path):
    argv = tiny_args(tiny_model_dir, tmp_path, tmp_path / "out", "--no-progress")
    assert glue_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"GLUE file for task 'mrpc' split 'train' not found: expected {tmp_path / 'MRPC' / 'train.tsv'}" in err
    assert not (tmp_path / "out").exists()


def test_malformed_tsv_row(glue_cli, capsys, tmp_path: Path, tiny_model_dir: Path, mrpc_dir: Path):
    bad = tmp_path / "glue"
    shutil.copytree(mrpc_dir / "MRPC", bad / "MRPC")
    lines = (bad / "MRPC" / "train.tsv").read_text(encoding="utf-8").split("\n")
    lines[4] = "\t".join(lines[4].split("\t")[:3])  # line 5 loses its two sentences
    (bad / "MRPC" / "train.tsv").write_text("\n".join(lines), encoding="utf-8")
    assert glue_cli.main(tiny_args(tiny_model_dir, bad, tmp_path / "out", "--no-progress")) == 2
    err = capsys.readouterr().err
    assert "train.tsv, line 5: malformed row, expected 5 tab-separated fields" in err


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_guards(glue_cli, capsys, tmp_path: Path, tiny_model_dir: Path, mrpc_dir: Path):
    out = tmp_path / "run"
    base = tiny_args(tiny_model_dir, mrpc_dir, out, "--method", "lora", "--no-progress", "--epochs", "1")
    assert glue_cli.main(base) == 0
    first = json.loads((out / "results.json").read_text())
    before = _snapshot(out)
    capsys.readouterr()

    # another learning rate: a clear error naming the difference, nothing written
    other = [*base[: base.index("--lr") + 1], "1e-2", *base[base.index("--lr") + 2 :], "--resume"]
    assert glue_cli.main(other) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "lr: 0.005 -> 0.01" in err and "Nothing was changed" in err
    # the same config without --resume: refuses to start over the existing checkpoints
    assert glue_cli.main(base) == 2
    assert "already holds checkpoints (steps [6])" in capsys.readouterr().err
    assert _snapshot(out) == before

    # --resume on the finished run: restores the end state, trains nothing, reports the same metrics
    assert glue_cli.main([*base, "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["history"] == first["history"] and again["resumed_from_step"] == 6
    assert again["timing"]["n"] == 0 and again["timing"]["compiles"] == 0


def test_compile_cache_second_run_compiles_nothing(tmp_path: Path, tiny_model_dir: Path, mrpc_dir: Path):
    """A second process with the same configuration loads every train step from the persistent cache:
    it adds no train-step entry to the cache directory; ``--compile-cache none`` writes nothing."""
    cache = tmp_path / "jit"

    def run(out: str, *extra: str) -> None:
        argv = tiny_args(tiny_model_dir, mrpc_dir, tmp_path / out, "--method", "lora", "--epochs", "1", "--no-progress")
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), *argv, *extra], capture_output=True, text=True, cwd=tmp_path, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    def train_entries() -> set[str]:
        return {p.name for p in cache.glob("jit__train_step-*")}

    run("a", "--compile-cache", str(cache))
    first = train_entries()
    assert first  # one entry per batch shape
    run("b", "--compile-cache", str(cache))
    assert train_entries() == first
    run("c", "--compile-cache", "none")
    assert train_entries() == first


def test_compile_cache_unwritable_is_one_clear_error(glue_cli, capsys, tmp_path: Path, tiny_model_dir: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    argv = tiny_args(tiny_model_dir, tmp_path, tmp_path / "out", "--compile-cache", str(blocker / "cache"))
    assert glue_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"compilation cache directory {blocker / 'cache'} is not writable" in err and "--compile-cache none" in err


def test_metrics_log_resume_drops_lines_past_the_checkpoint(glue_cli, tmp_path: Path):
    info = lambda step: glue_cli.train.StepInfo(step, 0, step - 1, 10, 0.5, 0.1, 8)  # noqa: E731
    log = glue_cli.MetricsLog(tmp_path, 0)
    for step in range(1, 6):
        log.step(info(step), 1e-3)
    log.close()
    log = glue_cli.MetricsLog(tmp_path, 3)  # resumed from the checkpoint at step 3
    log.step(info(4), 1e-3)
    log.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_tensorboard_report(glue_cli, tmp_path: Path):
    info = glue_cli.train.StepInfo(1, 0, 0, 10, 0.5, 0.1, 8)
    log = glue_cli.MetricsLog(tmp_path, 0, tensorboard=True)
    log.step(info, 1e-3)
    log.epoch({"epoch": 1, "step": 1, "train_loss": 0.5, "main": 0.7})
    log.close()
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
        raw = path.read_bytes()
        i = 0
        while i < len(raw):  # TFRecord: u64 length, u32 crc, data, u32 crc
            n = int.from_bytes(raw[i : i + 8], "little")
            event = event_pb2.Event.FromString(raw[i + 12 : i + 12 + n])
            i += 16 + n
            for v in event.summary.value:
                scalars[v.tag] = (event.step, v.simple_value)
    assert {"train/loss", "train/lr", "train/examples_per_s", "eval/main"} <= set(scalars)
    assert scalars["eval/main"][0] == 1 and scalars["eval/main"][1] == pytest.approx(0.7)


def test_compile_seconds_counts_compilations_not_calls():
    """``compile_seconds`` grows when a new program is traced and compiled, not when a compiled one runs."""
    import jax
    import jax.numpy as jnp

    from sora_jax.compile_cache import compile_seconds

    x = jnp.arange(13.0)  # eager operations compile too: every input is made first
    before = compile_seconds()
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + jnp.cos(x) / 7.0)
    f(x).block_until_ready()
    mid = compile_seconds()
    assert all(mid[k] > before[k] for k in ("trace_s", "lower_s", "backend_s", "total_s"))
    for _ in range(3):
        f(x).block_until_ready()
    assert compile_seconds() == mid
