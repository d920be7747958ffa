"""Tokenisation and length-bucketed batching of a GLUE split: :func:`encode` (ragged token ids),
:func:`batch_order` (shuffled, length-sorted within chunks), :func:`collate` (padding to a static
``(batch_size, T)``, ``T`` from a small set of :func:`length_rungs`) and :func:`epoch_batches` (all three)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sora_jax.data.readers import GlueSplit
from sora_jax.data.tasks import GlueDataError, get_task

DEFAULT_BUCKET_CHUNK_BATCHES = 50


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
