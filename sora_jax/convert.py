"""Hugging Face state dicts <-> sora-jax parameter trees, by one naming table.

Our parameter path is the Hugging Face name with ``.`` replaced by ``/`` and list indices written
``name_N`` (``encoder.layer.3`` -> ``encoder/layer_3``); the leaf names map as below. Linear weights
are stored transposed (``W: (d_in, d_out)`` here, ``(d_out, d_in)`` in PyTorch).

| ours        | Hugging Face | layout          |
|-------------|--------------|-----------------|
| `kernel`    | `weight`     | transpose       |
| `scale`     | `weight`     | same            |
| `embedding` | `weight`     | same            |
| other       | same name    | same            |
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_INDEXED = re.compile(r"(.+)_(\d+)")


def hf_key(path: tuple[str, ...]) -> str:
    """Our parameter path (``("bert", "encoder", "layer_0", ..., "kernel")``) -> Hugging Face key."""
    *modules, leaf = path
    parts = []
    for c in modules:
        m = _INDEXED.fullmatch(c)
        parts.extend([m.group(1), m.group(2)] if m else [c])
    parts.append(LEAF_TO_HF.get(leaf, leaf))
    return ".".join(parts)


def to_hf_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Our array -> the Hugging Face array (``kernel`` leaves are transposed)."""
    return np.swapaxes(value, -1, -2) if path[-1] == "kernel" else value


def from_hf_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """The Hugging Face array -> our array (inverse of :func:`to_hf_layout`)."""
    return np.swapaxes(value, -1, -2) if path[-1] == "kernel" else value


def iter_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Yield ``(path, leaf)`` for a nested dict of parameters, in sorted key order."""
    for k in sorted(tree):
        v = tree[k]
        if isinstance(v, Mapping):
            yield from iter_paths(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set ``tree[p0][p1]...[pn] = value``, creating dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def params_to_hf(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our parameter tree -> a Hugging Face state dict of NumPy arrays (PyTorch names and layout)."""
    return {hf_key(p): np.ascontiguousarray(to_hf_layout(p, np.asarray(v))) for p, v in iter_paths(params)}
