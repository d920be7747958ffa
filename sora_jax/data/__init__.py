"""Datasets for the experiments: GLUE reading, tokenisation, bucketed batching and metrics."""

from sora_jax.data.glue import (
    TASKS,
    Encoded,
    GlueDataError,
    GlueSplit,
    TaskSpec,
    batch_order,
    collate,
    compute_metrics,
    encode,
    epoch_batches,
    find_data_dir,
    get_task,
    length_rungs,
    load_split,
    padded_length,
    steps_per_epoch,
)

__all__ = [
    "TASKS",
    "Encoded",
    "GlueDataError",
    "GlueSplit",
    "TaskSpec",
    "batch_order",
    "collate",
    "compute_metrics",
    "encode",
    "epoch_batches",
    "find_data_dir",
    "get_task",
    "length_rungs",
    "load_split",
    "padded_length",
    "steps_per_epoch",
]
