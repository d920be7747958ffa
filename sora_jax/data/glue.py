"""GLUE tasks: reading, tokenisation, length-bucketed batching and the GLUE metrics.

Data sources (``load_split``):

* ``data_dir``: the original GLUE TSV layout, ``<data_dir>/<DirName>/<split>.tsv`` (``CoLA/train.tsv``,
  ``MNLI/dev_matched.tsv``, ...). Files are read with ``csv.reader(delimiter="\\t",
  quoting=csv.QUOTE_NONE)`` and ``encoding="utf-8-sig"``: GLUE fields contain unbalanced ``"`` that the
  default quoting silently merges or strips (MRPC, STS-B, RTE), and MRPC files start with a BOM. Text is
  kept byte-exact (no stripping). Every row must have as many fields as the header (CoLA: no header,
  4 fields).
* no ``data_dir``: ``datasets.load_dataset("nyu-mll/glue", <task>)`` from the Hugging Face hub.

Labels use the hub's ``ClassLabel`` order for both sources (``TaskSpec.label_names``), so a model
trained on one source evaluates on the other: e.g. RTE/QNLI ``entailment=0, not_entailment=1``, MNLI
``entailment=0, neutral=1, contradiction=2``, MRPC/QQP/CoLA/SST-2 ``"0"=0, "1"=1``. STS-B labels are
float32 scores in ``[0, 5]``.

Metrics (``compute_metrics``) are fractions in ``[0, 1]`` (multiply by 100 for the usual tables).
``"main"`` follows the GLUE leaderboard: a task with two metrics scores their mean (MRPC/QQP: mean of F1
and accuracy; STS-B: mean of Pearson and Spearman); CoLA scores Matthews correlation; the rest accuracy
(MNLI: each of matched / mismatched separately).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HUB_DATASET = "nyu-mll/glue"
ENV_DATA_DIR = "SORA_JAX_GLUE_DIR"
DEFAULT_BUCKET_CHUNK_BATCHES = 50


class GlueDataError(ValueError):
    """A GLUE data problem (unknown task/split, missing or malformed file, unknown label, no source)."""


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task: where its TSV columns are and how it is scored.

    Attributes:
      name: task key (``"mrpc"``); also the hub config name.
      dir_name: GLUE directory name (``"MRPC"``).
      text_columns: 0-based TSV columns of sentence 1 (and sentence 2 for pair tasks).
      label_column: 0-based TSV label column (negative counts from the end: MNLI's ``gold_label`` is -1).
      has_header: whether the TSV starts with a header line (CoLA does not).
      num_labels: classes (1 for the STS-B regression).
      is_regression: STS-B only.
      label_names: class names in label-id order (the hub's ``ClassLabel`` order).
      tsv_labels: the raw TSV label strings in label-id order (empty for regression).
      dev_splits: the labelled evaluation splits (``("dev",)``; MNLI matched and mismatched).
      metric_names: keys ``compute_metrics`` returns besides ``"main"``.
      main_metric: the key whose value is ``"main"`` (GLUE's per-task score).
      hub_text_columns: column names of the texts in ``nyu-mll/glue``.
    """

    name: str
    dir_name: str
    text_columns: tuple[int, ...]
    label_column: int
    has_header: bool
    num_labels: int
    is_regression: bool
    label_names: tuple[str, ...]
    tsv_labels: tuple[str, ...]
    dev_splits: tuple[str, ...]
    metric_names: tuple[str, ...]
    main_metric: str
    hub_text_columns: tuple[str, ...]

    @property
    def is_pair(self) -> bool:
        """Whether examples are sentence pairs."""
        return len(self.text_columns) == 2

    @property
    def splits(self) -> tuple[str, ...]:
        """The labelled splits: ``train`` and the dev splits."""
        return ("train", *self.dev_splits)


_DEV = ("dev",)
_ACC = ("accuracy",)
_F1_ACC = ("f1", "accuracy", "f1_accuracy_mean")
_BIN = ("0", "1")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "cola",
            "CoLA",
            (3,),
            1,
            False,
            2,
            False,
            ("unacceptable", "acceptable"),
            _BIN,
            _DEV,
            ("matthews_corrcoef",),
            "matthews_corrcoef",
            ("sentence",),
        ),
        TaskSpec(
            "sst2",
            "SST-2",
            (0,),
            1,
            True,
            2,
            False,
            ("negative", "positive"),
            _BIN,
            _DEV,
            _ACC,
            "accuracy",
            ("sentence",),
        ),
        TaskSpec(
            "mrpc",
            "MRPC",
            (3, 4),
            0,
            True,
            2,
            False,
            ("not_equivalent", "equivalent"),
            _BIN,
            _DEV,
            _F1_ACC,
            "f1_accuracy_mean",
            ("sentence1", "sentence2"),
        ),
        TaskSpec(
            "stsb",
            "STS-B",
            (7, 8),
            9,
            True,
            1,
            True,
            (),
            (),
            _DEV,
            ("pearson", "spearman", "pearson_spearman_mean"),
            "pearson_spearman_mean",
            ("sentence1", "sentence2"),
        ),
        TaskSpec(
            "qqp",
            "QQP",
            (3, 4),
            5,
            True,
            2,
            False,
            ("not_duplicate", "duplicate"),
            _BIN,
            _DEV,
            _F1_ACC,
            "f1_accuracy_mean",
            ("question1", "question2"),
        ),
        TaskSpec(
            "mnli",
            "MNLI",
            (8, 9),
            -1,
            True,
            3,
            False,
            ("entailment", "neutral", "contradiction"),
            ("entailment", "neutral", "contradiction"),
            ("dev_matched", "dev_mismatched"),
            _ACC,
            "accuracy",
            ("premise", "hypothesis"),
        ),
        TaskSpec(
            "qnli",
            "QNLI",
            (1, 2),
            3,
            True,
            2,
            False,
            ("entailment", "not_entailment"),
            ("entailment", "not_entailment"),
            _DEV,
            _ACC,
            "accuracy",
            ("question", "sentence"),
        ),
        TaskSpec(
            "rte",
            "RTE",
            (1, 2),
            3,
            True,
            2,
            False,
            ("entailment", "not_entailment"),
            ("entailment", "not_entailment"),
            _DEV,
            _ACC,
            "accuracy",
            ("sentence1", "sentence2"),
        ),
    )
}

# TSV split name -> hub split name.
_HUB_SPLITS = {
    "train": "train",
    "dev": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
}


def get_task(task: str) -> TaskSpec:
    """The ``TaskSpec`` of ``task`` (case-insensitive; ``"sst-2"``/``"sts-b"`` accepted)."""
    key = task.lower().replace("-", "")
    if key not in TASKS:
        raise GlueDataError(f"Unknown GLUE task {task!r}; known tasks: {', '.join(TASKS)}.")
    return TASKS[key]


def _check_split(spec: TaskSpec, split: str) -> None:
    if split not in spec.splits:
        raise GlueDataError(
            f"Unknown split {split!r} for GLUE task {spec.name!r}; labelled splits: {', '.join(spec.splits)} "
            "(GLUE test splits have no labels)."
        )


@dataclass
class GlueSplit:
    """One labelled split. ``labels: (N,)`` int32 class ids, or float32 scores for regression."""

    task: str
    split: str
    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.text_a)


# ----------------------------------------------------------------------------------------------- reading


def find_data_dir() -> Path | None:
    """The local GLUE TSV directory: ``$SORA_JAX_GLUE_DIR`` if set, else ``../shared/data/glue`` next to
    the repository root if present, else ``None``."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise GlueDataError(
                f"${ENV_DATA_DIR} is set to {env!r}, which is not a directory; point it at a directory with "
                "the GLUE TSV layout (<dir>/RTE/train.tsv, ...) or unset it."
            )
        return path
    candidate = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue"
    return candidate if candidate.is_dir() else None


def tsv_path(task: str, split: str, data_dir: str | os.PathLike[str]) -> Path:
    """``<data_dir>/<DirName>/<split>.tsv``."""
    spec = get_task(task)
    _check_split(spec, split)
    return Path(data_dir) / spec.dir_name / f"{split}.tsv"


# the score range of the regression tasks (STS-B: similarity from 0 to 5)
LABEL_RANGE = {"stsb": (0.0, 5.0)}


def _parse_label(spec: TaskSpec, raw: str, path: Path, line: int) -> int | float:
    if spec.is_regression:
        try:
            value = float(raw)
        except ValueError:
            raise GlueDataError(
                f"{path}, line {line}: unknown label value {raw!r} for task {spec.name!r}; expected a float "
                f"score in column {spec.label_column}."
            ) from None
        low, high = LABEL_RANGE.get(spec.name, (-np.inf, np.inf))
        if not (math.isfinite(value) and low <= value <= high):
            raise GlueDataError(
                f"{path}, line {line}: label {raw!r} for task {spec.name!r} is not a finite score in "
                f"[{low:g}, {high:g}] (column {spec.label_column}); fix or drop that row."
            )
        return value
    try:
        return spec.tsv_labels.index(raw)
    except ValueError:
        raise GlueDataError(
            f"{path}, line {line}: unknown label value {raw!r} for task {spec.name!r}; expected one of "
            f"{list(spec.tsv_labels)} in column {spec.label_column}. Is this the right file for the task?"
        ) from None


def _decoded(reader: Any, path: Path) -> Iterator[list[str]]:
    """The rows of ``reader``; a byte that is not UTF-8 is a :class:`GlueDataError` naming the file and line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError:
            raw = path.read_bytes()  # decoded in chunks: find the line of the first bad byte in the whole file
            try:
                raw.decode("utf-8")
                where, what = f"after line {reader.line_num}", "invalid"
            except UnicodeDecodeError as e:
                line = raw[: e.start].count(b"\n") + 1
                where, what = f"line {line}", f"{raw[e.start : e.start + 1]!r}, {e.reason}"
            raise GlueDataError(
                f"{path}, {where}: not UTF-8 text (byte {what}); GLUE files are UTF-8: re-encode the file "
                "(e.g. iconv -f latin1 -t utf-8)."
            ) from None
        yield row


def read_tsv(task: str, split: str, data_dir: str | os.PathLike[str], max_samples: int | None = None) -> GlueSplit:
    """Read ``<data_dir>/<DirName>/<split>.tsv`` (QUOTE_NONE, utf-8-sig); see the module docstring."""
    spec = get_task(task)
    path = tsv_path(spec.name, split, data_dir)
    if not path.is_file():
        raise GlueDataError(
            f"GLUE file for task {spec.name!r} split {split!r} not found: expected {path}. Pass a data "
            f"directory with the GLUE TSV layout (<data_dir>/{spec.dir_name}/{split}.tsv), or no data "
            "directory to load from the Hugging Face hub (needs network access)."
        )
    texts: list[list[str]] = [[] for _ in spec.text_columns]
    labels: list[int | float] = []
    n_fields: int | None = None
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in _decoded(reader, path):
            if not row:  # blank line (e.g. a trailing empty line)
                continue
            if n_fields is None:
                n_fields = len(row)
                needed = max(*spec.text_columns, spec.label_column if spec.label_column >= 0 else 0) + 1
                if n_fields < needed:
                    raise GlueDataError(
                        f"{path}, line {reader.line_num}: {n_fields} tab-separated fields, but task "
                        f"{spec.name!r} needs at least {needed}. Is this the right file for the task?"
                    )
                if spec.has_header:
                    continue
            if len(row) != n_fields:
                raise GlueDataError(
                    f"{path}, line {reader.line_num}: malformed row, expected {n_fields} tab-separated fields "
                    f"(as the {'header' if spec.has_header else 'first row'}), got {len(row)}. Read GLUE files "
                    "as the original tab-separated text (no quote processing); a re-saved or re-quoted file "
                    "can merge or split fields."
                )
            if max_samples is not None and len(labels) >= max_samples:
                break
            for out, col in zip(texts, spec.text_columns, strict=True):
                out.append(row[col])
            labels.append(_parse_label(spec, row[spec.label_column], path, reader.line_num))
    if not labels:
        what = "is empty" if n_fields is None else "has a header but no rows" if spec.has_header else "has no rows"
        raise GlueDataError(
            f"{path} {what}: task {spec.name!r} needs labelled examples in its {split} split. Restore the file "
            "(the GLUE TSV layout), or point --data-dir at a complete copy."
        )
    dtype = np.float32 if spec.is_regression else np.int32
    return GlueSplit(
        spec.name,
        split,
        texts[0],
        texts[1] if spec.is_pair else None,
        np.asarray(labels, dtype=dtype),
        source=str(path),
    )


def load_hub(task: str, split: str, max_samples: int | None = None) -> GlueSplit:
    """Load one split of ``nyu-mll/glue`` with ``datasets.load_dataset`` (needs network or a HF cache)."""
    spec = get_task(task)
    _check_split(spec, split)
    hub_split = _HUB_SPLITS[split]
    try:
        import datasets

        ds: Any = datasets.load_dataset(HUB_DATASET, spec.name, split=hub_split)
        if max_samples is not None:
            ds = ds.select(range(min(max_samples, len(ds))))
        columns = [list(ds[c]) for c in spec.hub_text_columns]
        raw_labels = np.asarray(ds["label"])
    except Exception as exc:
        raise GlueDataError(
            f"Could not load GLUE task {spec.name!r} split {split!r} from the Hugging Face hub "
            f"({HUB_DATASET}, split {hub_split!r}): {type(exc).__name__}: {exc}. Provide the data locally: pass "
            f"--data-dir (data_dir=) pointing at a directory with the GLUE TSV layout "
            f"(<data_dir>/{spec.dir_name}/{split}.tsv) or set ${ENV_DATA_DIR}; or allow network access to the "
            "hub."
        ) from exc
    dtype = np.float32 if spec.is_regression else np.int32
    labels = raw_labels.astype(dtype)
    if not spec.is_regression and labels.size and (labels.min() < 0 or labels.max() >= spec.num_labels):
        raise GlueDataError(
            f"Hub split {hub_split!r} of {spec.name!r} has label ids outside [0, {spec.num_labels}); "
            "unlabelled (test) splits cannot be used for training or evaluation."
        )
    return GlueSplit(
        spec.name,
        split,
        columns[0],
        columns[1] if spec.is_pair else None,
        labels,
        source=f"hub:{HUB_DATASET}/{spec.name}/{hub_split}",
    )


def load_split(
    task: str, split: str, data_dir: str | os.PathLike[str] | None = None, max_samples: int | None = None
) -> GlueSplit:
    """One labelled GLUE split: from ``data_dir`` (GLUE TSV layout) if given, else from the hub.

    ``split``: ``"train"`` or one of ``TASKS[task].dev_splits``. ``max_samples``: keep the first rows only.
    """
    spec = get_task(task)
    _check_split(spec, split)
    if max_samples is not None and max_samples < 1:
        raise GlueDataError(f"max_samples must be a positive integer or None, got {max_samples}.")
    if data_dir is not None:
        return read_tsv(spec.name, split, data_dir, max_samples)
    return load_hub(spec.name, split, max_samples)


# ------------------------------------------------------------------------------------------ tokenising


@dataclass
class Encoded:
    """A tokenised split (ragged, unpadded).

    ``input_ids[i], token_type_ids[i]: (lengths[i],)`` int32; ``lengths: (N,)`` int32; ``labels: (N,)``
    int32 or float32; ``max_length``: the truncation length; ``pad_id``: the tokenizer's pad token id.
    """

    task: str
    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    lengths: np.ndarray
    labels: np.ndarray
    max_length: int
    pad_id: int
    is_regression: bool = field(default=False)

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer: Any, split: GlueSplit, max_length: int) -> Encoded:
    """Tokenise ``split`` with a Hugging Face tokenizer (``[CLS] a [SEP] (b [SEP])``), truncated to
    ``max_length`` tokens (pairs: longest-first), no padding."""
    if max_length < 4:
        raise GlueDataError(f"max_length must be at least 4 tokens, got {max_length}.")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        raise GlueDataError("The tokenizer has no pad token (pad_token_id is None); set tokenizer.pad_token.")
    args = (split.text_a,) if split.text_b is None else (split.text_a, split.text_b)
    out = tokenizer(
        *args,
        truncation=True,
        max_length=max_length,
        padding=False,
        return_token_type_ids=True,
        return_attention_mask=False,
    )
    ids = [np.asarray(x, dtype=np.int32) for x in out["input_ids"]]
    types_raw = out.get("token_type_ids")
    types = (
        [np.asarray(x, dtype=np.int32) for x in types_raw] if types_raw is not None else [np.zeros_like(x) for x in ids]
    )
    lengths = np.asarray([len(x) for x in ids], dtype=np.int32)
    spec = get_task(split.task)
    return Encoded(
        spec.name, ids, types, lengths, np.asarray(split.labels), max_length, int(pad_id), spec.is_regression
    )


# ------------------------------------------------------------------------------------------- batching


def length_rungs(max_length: int, pad_to_multiple: int = 8) -> tuple[int, ...]:
    """The padded sequence lengths batches may have (the jit shape set).

    Policy: ``m * k`` for ``k`` in ``1, 2, 3, 4, 6, 8, 12, 16, 24, ...`` (powers of two and 1.5x powers of
    two, ``m = pad_to_multiple``), below ``max_length`` rounded up to ``m``, plus that rounded
    ``max_length``. A batch pads to the smallest rung >= its longest example, so at most about
    ``2 log2(max_length / m) + 2`` shapes compile (8 for ``max_length=128, m=8``:
    8, 16, 24, 32, 48, 64, 96, 128) and a batch carries at most 50 % extra length over the plain
    multiple-of-``m`` rounding. ``pad_to_multiple = max_length`` gives a single static shape.
    """
    if pad_to_multiple < 1 or max_length < 1:
        raise GlueDataError(f"pad_to_multiple and max_length must be >= 1, got {pad_to_multiple}, {max_length}.")
    m = pad_to_multiple
    top = -(-max_length // m) * m
    ks = {1, 2, 3, 4}
    p = 4
    while m * p < top:
        ks.update((p, p * 3 // 2, 2 * p))
        p *= 2
    return tuple(sorted({m * k for k in ks if m * k < top} | {top}))


def padded_length(longest: int, rungs: Sequence[int]) -> int:
    """The smallest rung >= ``longest`` (``rungs`` sorted ascending, last one >= every length)."""
    i = int(np.searchsorted(np.asarray(rungs), longest, side="left"))
    if i == len(rungs):
        raise GlueDataError(f"Sequence length {longest} exceeds the largest padded length {rungs[-1]}.")
    return int(rungs[i])


def steps_per_epoch(num_examples: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches ``epoch_batches`` yields per epoch."""
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


def batch_order(
    lengths: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    bucket: bool = True,
    drop_last: bool = False,
    chunk_batches: int = DEFAULT_BUCKET_CHUNK_BATCHES,
) -> list[np.ndarray]:
    """Example indices of each batch of one epoch (deterministic for ``(seed, epoch)``).

    ``shuffle``: permute examples, then (after bucketing) permute the batch order. ``bucket``: sort by
    length (stable) within consecutive chunks of ``chunk_batches * batch_size`` examples before cutting
    batches, so a batch holds similar lengths while the epoch stays random at the chunk level. The one
    partial batch (if ``N % batch_size``) is dropped with ``drop_last``.
    """
    if batch_size < 1:
        raise GlueDataError(f"batch_size must be >= 1, got {batch_size}.")
    if seed < 0 or epoch < 0:
        raise GlueDataError(f"seed and epoch must be non-negative integers, got seed={seed}, epoch={epoch}.")
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    if bucket:
        chunk = max(1, chunk_batches) * batch_size
        order = (
            np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in np.split(order, range(chunk, n, chunk))])
            if n
            else order
        )
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def collate(enc: Encoded, indices: np.ndarray, batch_size: int, length: int) -> dict[str, np.ndarray]:
    """Pad examples ``indices`` into a ``(batch_size, length)`` batch.

    Returns ``input_ids, attention_mask, token_type_ids: (B, T)`` int32, ``labels: (B,)`` int32 (float32
    for regression), ``weights: (B,)`` float32 (1 real row, 0 padding row), ``index: (B,)`` int32 (the
    example index, -1 for padding rows). Padding rows are all pad tokens with an all-zero mask.
    """
    ids = np.full((batch_size, length), enc.pad_id, dtype=np.int32)
    types = np.zeros((batch_size, length), dtype=np.int32)
    mask = np.zeros((batch_size, length), dtype=np.int32)
    label_dtype = np.float32 if enc.is_regression else np.int32
    labels = np.zeros((batch_size,), dtype=label_dtype)
    weights = np.zeros((batch_size,), dtype=np.float32)
    index = np.full((batch_size,), -1, dtype=np.int32)
    for row, i in enumerate(indices):
        n = int(enc.lengths[i])
        ids[row, :n] = enc.input_ids[i]
        types[row, :n] = enc.token_type_ids[i]
        mask[row, :n] = 1
    k = len(indices)
    labels[:k] = enc.labels[indices]
    weights[:k] = 1.0
    index[:k] = indices
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": types,
        "labels": labels,
        "weights": weights,
        "index": index,
    }


def epoch_batches(
    enc: Encoded,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    bucket: bool = True,
    pad_to_multiple: int = 8,
    drop_last: bool = False,
    chunk_batches: int = DEFAULT_BUCKET_CHUNK_BATCHES,
) -> list[dict[str, np.ndarray]]:
    """All batches of one epoch, deterministic for ``(seed, epoch)`` (a resumed run skips the first k).

    Order: ``batch_order`` (shuffle, sort by length within chunks of ``chunk_batches`` batches, cut,
    shuffle batch order). Each batch is ``collate``-d to ``(batch_size, T)``: rows padded up to
    ``batch_size`` with weight 0 (static batch shape; losses and metrics must ignore weight-0 rows), and
    ``T`` = the smallest of ``length_rungs(enc.max_length, pad_to_multiple)`` >= the batch's longest
    example. For evaluation use ``shuffle=False`` and realign predictions with ``batch["index"]``.
    """
    if len(enc) == 0:
        raise GlueDataError(f"No examples to batch for task {enc.task!r}.")
    rungs = length_rungs(max(enc.max_length, int(enc.lengths.max())), pad_to_multiple)
    return [
        collate(enc, idx, batch_size, padded_length(int(enc.lengths[idx].max()), rungs))
        for idx in batch_order(
            enc.lengths,
            batch_size,
            seed=seed,
            epoch=epoch,
            shuffle=shuffle,
            bucket=bucket,
            drop_last=drop_last,
            chunk_batches=chunk_batches,
        )
    ]


# -------------------------------------------------------------------------------------------- metrics


def _correlation(fn: Any, x: np.ndarray, y: np.ndarray) -> float:
    """``fn(x, y)`` statistic; 0.0 where undefined (constant input), as sklearn does for MCC."""
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    return float(fn(x, y).statistic)


def compute_metrics(
    task: str, predictions: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, float]:
    """GLUE metrics as fractions, plus ``"main"`` (see module docstring for the convention).

    ``predictions``: ``(N,)`` class ids or ``(N, C)`` logits (argmax), or ``(N,)`` / ``(N, 1)`` scores for
    STS-B. ``labels: (N,)``. ``weights: (N,)`` optional; rows with weight 0 (batch padding) are dropped.
    Returns accuracy (classification); ``f1`` (positive class 1) and accuracy (MRPC, QQP);
    ``matthews_corrcoef`` (CoLA); ``pearson``, ``spearman`` (STS-B).
    """
    from scipy import stats
    from sklearn import metrics as skm

    spec = get_task(task)
    preds = np.asarray(predictions)
    labels = np.asarray(labels)
    if spec.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
    elif preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    if preds.ndim != 1 or preds.shape != labels.shape:
        raise GlueDataError(
            f"compute_metrics({spec.name!r}): predictions {np.asarray(predictions).shape} do not match labels "
            f"{labels.shape}; pass (N,) predictions or (N, C) logits for N labels."
        )
    if weights is not None:
        keep = np.asarray(weights) > 0
        preds, labels = preds[keep], labels[keep]
    if labels.size == 0:
        raise GlueDataError(f"compute_metrics({spec.name!r}): no examples with nonzero weight.")
    out: dict[str, float] = {}
    if spec.is_regression:
        p, y = preds.astype(np.float64), labels.astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["pearson"] = _correlation(stats.pearsonr, p, y)
            out["spearman"] = _correlation(stats.spearmanr, p, y)
        out["pearson_spearman_mean"] = (out["pearson"] + out["spearman"]) / 2
    else:
        out["accuracy"] = float(skm.accuracy_score(labels, preds))
        if spec.name == "cola":
            out["matthews_corrcoef"] = float(skm.matthews_corrcoef(labels, preds))
        if "f1" in spec.metric_names:
            out["f1"] = float(skm.f1_score(labels, preds, pos_label=1, average="binary", zero_division=0.0))
            out["f1_accuracy_mean"] = (out["f1"] + out["accuracy"]) / 2
    out["main"] = out[spec.main_metric]
    return out
