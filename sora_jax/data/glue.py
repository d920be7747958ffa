"""GLUE tasks: reading, tokenisation, length-bucketed batching and the GLUE metrics, by concern:

* :mod:`sora_jax.data.tasks`: the task table, one frozen :class:`TaskSpec` record per task
  (``TASKS``, ``get_task``) and :class:`GlueDataError`;
* :mod:`sora_jax.data.readers`: one labelled split from the GLUE TSV files (``data_dir``, read byte-exact
  with ``csv.QUOTE_NONE``) or from the Hugging Face hub (``load_split``), every malformed input one
  error naming the file, the line and the fix;
* :mod:`sora_jax.data.batching`: tokenisation (``encode``) and length-bucketed, padded batches
  (``epoch_batches``);
* :mod:`sora_jax.data.metrics`: ``compute_metrics``, fractions in ``[0, 1]`` with GLUE's ``"main"`` score.

This module re-exports all of them: ``from sora_jax.data.glue import ...`` is the public entry point.
Labels use the hub's ``ClassLabel`` order for both sources, so a model trained on one source evaluates
on the other.
"""

from __future__ import annotations

from sora_jax.data.batching import (
    DEFAULT_BUCKET_CHUNK_BATCHES,
    Encoded,
    batch_order,
    collate,
    encode,
    epoch_batches,
    length_rungs,
    padded_length,
    steps_per_epoch,
)
from sora_jax.data.metrics import compute_metrics
from sora_jax.data.readers import (
    ENV_DATA_DIR,
    HUB_DATASET,
    GlueSplit,
    find_data_dir,
    load_hub,
    load_split,
    read_tsv,
    tsv_path,
)
from sora_jax.data.tasks import HUB_SPLITS, LABEL_RANGE, TASKS, GlueDataError, TaskSpec, check_split, get_task

__all__ = [
    "DEFAULT_BUCKET_CHUNK_BATCHES",
    "ENV_DATA_DIR",
    "HUB_DATASET",
    "HUB_SPLITS",
    "LABEL_RANGE",
    "TASKS",
    "Encoded",
    "GlueDataError",
    "GlueSplit",
    "TaskSpec",
    "batch_order",
    "check_split",
    "collate",
    "compute_metrics",
    "encode",
    "epoch_batches",
    "find_data_dir",
    "get_task",
    "length_rungs",
    "load_hub",
    "load_split",
    "padded_length",
    "read_tsv",
    "steps_per_epoch",
    "tsv_path",
]
