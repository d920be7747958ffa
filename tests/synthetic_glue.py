"""Synthetic GLUE data for tests: files in the real layout (headers, columns, quoting, label spellings) whose
labels a small model can learn from the text, for machines without the shared GLUE copy."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sora_jax.data.glue import TASKS, get_task

_WORDS = (
    "the",
    "a",
    "man",
    "woman",
    "child",
    "dog",
    "cat",
    "house",
    "car",
    "river",
    "city",
    "team",
    "game",
    "film",
    "story",
    "music",
    "book",
    "paper",
    "road",
    "tree",
    "market",
    "school",
    "night",
    "morning",
    "plan",
    "report",
    "price",
    "company",
    "court",
    "law",
    "water",
    "food",
    "light",
    "song",
    ").split(",
)
_POSITIVE = ("good", "great", "fine", "happy", "bright")
_NEGATIVE = ("bad", "poor", "sad", "dark", "awful")
MANIFEST = "synthetic_manifest.json"


def _sentence(rng: np.random.Generator, marker: str | None = None) -> str:
    n = int(min(60, rng.geometric(0.08) + 2))  # skewed lengths 3..60 words, mean ~14
    words = list(rng.choice(_WORDS, size=n))
    if marker is not None:
        words[int(rng.integers(0, n))] = marker
    return " ".join(words).capitalize() + "."


def _synthetic_rows(task: str, split: str, n: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(lines, raw labels) of one synthetic split in the task's GLUE layout (lines without newline)."""
    spec = TASKS[task]
    lines: list[str] = []
    raw: list[str] = []
    for i in range(n):
        y = i % 2 if spec.num_labels == 2 else i % max(spec.num_labels, 1)
        pool = _POSITIVE if y == 0 else _NEGATIVE
        marker = str(rng.choice(pool))
        a, b = _sentence(rng, marker), _sentence(rng, marker if y == 0 else None)
        label = spec.tsv_labels[y] if not spec.is_regression else f"{rng.uniform(0, 5):.{1 + i % 3}f}"
        if task == "stsb" and i % 2 == 0:
            b = a  # identical pair: a high score
            label = f"{rng.uniform(4, 5):.3f}"
        if i == 1 and task in ("rte", "mrpc", "stsb"):
            a = ' "' + a  # leading space and a stray quote (GLUE quirk), must survive verbatim
        if i == 2 and task in ("mrpc", "stsb", "qqp"):
            b = '"' + b + " 'quoted,' he said"  # unbalanced double quote
        raw.append(label)
        if task == "cola":
            lines.append(f"gj04\t{label}\t{'' if label == '1' else '*'}\t{a}")
        elif task == "sst2":
            lines.append(f"{a.lower()} \t{label}")
        elif task == "mrpc":
            lines.append(f"{label}\t{1000 + i}\t{2000 + i}\t{a}\t{b}")
        elif task == "stsb":
            lines.append(f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t{label}")
        elif task == "qqp":
            lines.append(f"{i}\t{2 * i}\t{2 * i + 1}\t{a}?\t{b}?\t{label}")
        elif task == "qnli":
            lines.append(f"{i}\t{a}?\t{b}\t{label}")
        elif task == "rte":
            lines.append(f"{i}\t{a}\t{b}\t{label}")
        elif task == "mnli":
            extra = "\t".join([label] * 5) + "\t" if split != "train" else f"{label}\t"
            lines.append(f"{i}\t{i}\t{i}e\tfiction\t( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})\t{a}\t{b}\t{extra}{label}")
    return lines, raw


_HEADERS = {
    "sst2": "sentence\tlabel",
    "mrpc": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
    "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
    "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
    "qnli": "index\tquestion\tsentence\tlabel",
    "rte": "index\tsentence1\tsentence2\tlabel",
}
_MNLI_HEAD = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\t"
)


def _header(task: str, split: str) -> str | None:
    if task == "mnli":
        return _MNLI_HEAD + (
            "label1\tgold_label" if split == "train" else "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
        )
    return _HEADERS.get(task)


def synthetic_glue_dir(
    root: Path,
    tasks: Sequence[str] = ("mrpc", "rte", "stsb", "cola", "sst2"),
    n_train: int = 64,
    n_dev: int = 32,
    seed: int = 0,
) -> Path:
    """Write tiny random GLUE TSVs in the original layouts under ``root`` and return ``root``.

    Same headers, column positions and quirks as the real files (MRPC BOM, CoLA without header and
    without a final newline in ``dev.tsv``, SST-2 trailing space, fields with unbalanced ``"``, an RTE /
    MRPC / STS-B sentence starting with `` "``). Labels are learnable (a marker word). ``root/
    synthetic_manifest.json`` records, per task and split, the row count and raw-label counts.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    manifest: dict[str, dict[str, Any]] = {}
    for name in tasks:
        spec = get_task(name)
        task_dir = root / spec.dir_name
        task_dir.mkdir(parents=True, exist_ok=True)
        manifest[spec.name] = {}
        for split in spec.splits:
            n = n_train if split == "train" else n_dev
            lines, raw = _synthetic_rows(spec.name, split, n, rng)
            header = _header(spec.name, split)
            text = "\n".join(([header] if header else []) + lines)
            if not (spec.name == "cola" and split == "dev"):
                text += "\n"
            (task_dir / f"{split}.tsv").write_text(text, encoding="utf-8")
            counts = {} if spec.is_regression else dict(Counter(raw))
            manifest[spec.name][split] = {"rows": n, "label_counts": counts}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return root
