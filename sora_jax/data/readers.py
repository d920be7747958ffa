"""Reading one labelled GLUE split into a :class:`GlueSplit`, from the TSV files or the Hugging Face hub.

* ``data_dir``: the original GLUE TSV layout, ``<data_dir>/<DirName>/<split>.tsv`` (``CoLA/train.tsv``,
  ``MNLI/dev_matched.tsv``, ...). Files are read with ``csv.reader(delimiter="\\t",
  quoting=csv.QUOTE_NONE)`` and ``encoding="utf-8-sig"``: GLUE fields contain unbalanced ``"`` that the
  default quoting silently merges or strips (MRPC, STS-B, RTE), and MRPC files start with a BOM. Text is
  kept byte-exact (no stripping). Every row must have as many fields as the header (CoLA: no header,
  4 fields). A malformed file is one :class:`GlueDataError` naming the file, the line and the fix.
* no ``data_dir``: ``datasets.load_dataset("nyu-mll/glue", <task>)`` from the Hugging Face hub.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sora_jax.data.tasks import HUB_SPLITS, LABEL_RANGE, GlueDataError, TaskSpec, check_split, get_task

HUB_DATASET = "nyu-mll/glue"
ENV_DATA_DIR = "SORA_JAX_GLUE_DIR"


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
    check_split(spec, split)
    return Path(data_dir) / spec.dir_name / f"{split}.tsv"


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
    check_split(spec, split)
    hub_split = HUB_SPLITS[split]
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
    check_split(spec, split)
    if max_samples is not None and max_samples < 1:
        raise GlueDataError(f"max_samples must be a positive integer or None, got {max_samples}.")
    if data_dir is not None:
        return read_tsv(spec.name, split, data_dir, max_samples)
    return load_hub(spec.name, split, max_samples)
