"""The GLUE task table: one frozen :class:`TaskSpec` record per task (its files, columns, labels and
metric), looked up with :func:`get_task`.

Labels use the hub's ``ClassLabel`` order for both sources (``TaskSpec.label_names``), so a model
trained on the TSV files evaluates on the hub's copy and back: e.g. RTE/QNLI ``entailment=0,
not_entailment=1``, MNLI ``entailment=0, neutral=1, contradiction=2``, MRPC/QQP/CoLA/SST-2 ``"0"=0,
"1"=1``. STS-B labels are float32 scores in ``[0, 5]`` (``LABEL_RANGE``).
"""

from __future__ import annotations

from dataclasses import dataclass


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
            name="cola",
            dir_name="CoLA",
            has_header=False,
            text_columns=(3,),
            hub_text_columns=("sentence",),
            label_column=1,
            num_labels=2,
            is_regression=False,
            label_names=("unacceptable", "acceptable"),
            tsv_labels=_BIN,
            dev_splits=_DEV,
            metric_names=("matthews_corrcoef",),
            main_metric="matthews_corrcoef",
        ),
        TaskSpec(
            name="sst2",
            dir_name="SST-2",
            has_header=True,
            text_columns=(0,),
            hub_text_columns=("sentence",),
            label_column=1,
            num_labels=2,
            is_regression=False,
            label_names=("negative", "positive"),
            tsv_labels=_BIN,
            dev_splits=_DEV,
            metric_names=_ACC,
            main_metric="accuracy",
        ),
        TaskSpec(
            name="mrpc",
            dir_name="MRPC",
            has_header=True,
            text_columns=(3, 4),
            hub_text_columns=("sentence1", "sentence2"),
            label_column=0,
            num_labels=2,
            is_regression=False,
            label_names=("not_equivalent", "equivalent"),
            tsv_labels=_BIN,
            dev_splits=_DEV,
            metric_names=_F1_ACC,
            main_metric="f1_accuracy_mean",
        ),
        TaskSpec(
            name="stsb",
            dir_name="STS-B",
            has_header=True,
            text_columns=(7, 8),
            hub_text_columns=("sentence1", "sentence2"),
            label_column=9,
            num_labels=1,
            is_regression=True,
            label_names=(),
            tsv_labels=(),
            dev_splits=_DEV,
            metric_names=("pearson", "spearman", "pearson_spearman_mean"),
            main_metric="pearson_spearman_mean",
        ),
        TaskSpec(
            name="qqp",
            dir_name="QQP",
            has_header=True,
            text_columns=(3, 4),
            hub_text_columns=("question1", "question2"),
            label_column=5,
            num_labels=2,
            is_regression=False,
            label_names=("not_duplicate", "duplicate"),
            tsv_labels=_BIN,
            dev_splits=_DEV,
            metric_names=_F1_ACC,
            main_metric="f1_accuracy_mean",
        ),
        TaskSpec(
            name="mnli",
            dir_name="MNLI",
            has_header=True,
            text_columns=(8, 9),
            hub_text_columns=("premise", "hypothesis"),
            label_column=-1,
            num_labels=3,
            is_regression=False,
            label_names=("entailment", "neutral", "contradiction"),
            tsv_labels=("entailment", "neutral", "contradiction"),
            dev_splits=("dev_matched", "dev_mismatched"),
            metric_names=_ACC,
            main_metric="accuracy",
        ),
        TaskSpec(
            name="qnli",
            dir_name="QNLI",
            has_header=True,
            text_columns=(1, 2),
            hub_text_columns=("question", "sentence"),
            label_column=3,
            num_labels=2,
            is_regression=False,
            label_names=("entailment", "not_entailment"),
            tsv_labels=("entailment", "not_entailment"),
            dev_splits=_DEV,
            metric_names=_ACC,
            main_metric="accuracy",
        ),
        TaskSpec(
            name="rte",
            dir_name="RTE",
            has_header=True,
            text_columns=(1, 2),
            hub_text_columns=("sentence1", "sentence2"),
            label_column=3,
            num_labels=2,
            is_regression=False,
            label_names=("entailment", "not_entailment"),
            tsv_labels=("entailment", "not_entailment"),
            dev_splits=_DEV,
            metric_names=_ACC,
            main_metric="accuracy",
        ),
    )
}

# the score range of the regression tasks (STS-B: similarity from 0 to 5)
LABEL_RANGE = {"stsb": (0.0, 5.0)}


# TSV split name -> hub split name.
HUB_SPLITS = {
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


def check_split(spec: TaskSpec, split: str) -> None:
    """Raise :class:`GlueDataError` unless ``split`` is one of ``spec``'s labelled splits."""
    if split not in spec.splits:
        raise GlueDataError(
            f"Unknown split {split!r} for GLUE task {spec.name!r}; labelled splits: {', '.join(spec.splits)} "
            "(GLUE test splits have no labels)."
        )
