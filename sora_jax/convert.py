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

A model with scanned layers (``scan_layers=True``) keeps its ``L`` blocks as one module whose leaves are
stacked on a leading axis: ``encoder/layer/.../kernel (L, d_in, d_out)`` is
``encoder.layer.{0..L-1}....weight`` (:func:`stack_layers`, :func:`unstack_layers`).
"""

from __future__ import annotations

import dataclasses
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


def hf_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Our array <-> the Hugging Face array: a ``kernel`` leaf ``(..., d_in, d_out)`` is transposed to
    ``nn.Linear.weight``'s ``(..., d_out, d_in)`` and back (the map is its own inverse); others are unchanged."""
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


def _node(tree: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any]:
    for k in path:
        tree = tree[k]
    return tree


def _replace_node(tree: Mapping[str, Any], path: tuple[str, ...], node: dict[str, Any]) -> dict[str, Any]:
    if not path:
        return node
    out = dict(tree)
    out[path[0]] = _replace_node(tree[path[0]], path[1:], node)
    return out


def stack_layers(params: Mapping[str, Any], stack: str) -> dict[str, Any]:
    """``stack_0 ... stack_{L-1}`` (``stack`` a ``/``-joined path such as ``bert/encoder/layer``) -> one
    subtree ``stack`` whose leaves are the blocks' leaves stacked on a new leading axis ``(L, ...)``.

    Raises ``KeyError`` when the path's parent does not exist or holds no ``name_0``."""
    import jax
    import jax.numpy as jnp

    *parent, name = stack.split("/")
    node = _node(params, tuple(parent))
    indexed = {int(m.group(2)): k for k in node if (m := _INDEXED.fullmatch(k)) and m.group(1) == name}
    if not indexed:
        raise KeyError(f"no {name}_0 under {'/'.join(parent)!r} to stack")
    n = len(indexed)
    if sorted(indexed) != list(range(n)):
        raise KeyError(f"{stack}: blocks {sorted(indexed)} are not 0..{n - 1}")
    new = {k: v for k, v in node.items() if k not in indexed.values()}
    new[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *[node[indexed[i]] for i in range(n)])
    return _replace_node(params, tuple(parent), new)


def unstack_layers(params: Mapping[str, Any], stack: str) -> dict[str, Any]:
    """The inverse of :func:`stack_layers`: ``stack`` ``(L, ...)`` -> ``stack_0 ... stack_{L-1}``."""
    import jax

    *parent, name = stack.split("/")
    node = _node(params, tuple(parent))
    stacked = node[name]
    n = jax.tree.leaves(stacked)[0].shape[0]
    new = {k: v for k, v in node.items() if k != name}
    for i in range(n):
        new[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return _replace_node(params, tuple(parent), new)


def params_to_hf(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our parameter tree -> a Hugging Face state dict of NumPy arrays (PyTorch names and layout)."""
    return {hf_key(p): np.ascontiguousarray(hf_layout(p, np.asarray(v))) for p, v in iter_paths(params)}


# -- checkpoint state dicts -> our parameter tree --------------------------------------------------
class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message lists every problem at once."""

    def __init__(self, problems: list[str], source: str = "checkpoint"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} does not match the model ({len(self.problems)} problem(s)):\n{lines}")


# legacy names that transformers renames on load ("legacy" conversion mapping)
_LEGACY_RENAMES = (
    (re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"),
    (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias"),
)


def rename_legacy(key: str) -> str:
    """``...LayerNorm.gamma`` -> ``...LayerNorm.weight``, ``...LayerNorm.beta`` -> ``...LayerNorm.bias``."""
    for pattern, new in _LEGACY_RENAMES:
        key = pattern.sub(new, key)
    return key


def flax_tree_to_params(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A Hugging Face *Flax* parameter tree -> ours: numeric path parts join their parent
    (``layer/0`` -> ``layer_0``). Leaves (``kernel``/``scale``/``embedding``/``bias``) are already in
    the JAX layout. A top-level ``{"params": ...}`` wrapper is removed."""
    if set(tree) == {"params"} and isinstance(tree["params"], Mapping):
        tree = tree["params"]
    out: dict[str, Any] = {}
    for path, leaf in iter_paths(tree):
        parts: list[str] = []
        for c in path:
            if str(c).isdigit() and parts:
                parts[-1] = f"{parts[-1]}_{c}"
            else:
                parts.append(str(c))
        set_path(out, tuple(parts), np.asarray(leaf))
    return out


@dataclasses.dataclass
class MatchReport:
    """What :func:`state_dict_to_params` did besides loading: all lists of our paths or HF keys.

    Attributes:
      initialized: our paths of head parameters absent from the checkpoint (to be initialised).
      tied: our paths filled from the parameter they are tied to.
      ignored: checkpoint keys the model does not use (buffers, pre-training heads, pooler).
      dropped_heads: checkpoint keys of a task head the built model does not have.
    """

    initialized: list[str] = dataclasses.field(default_factory=list)
    tied: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    dropped_heads: list[str] = dataclasses.field(default_factory=list)


def _adjust_prefix(keys: list[str], model_keys: set[str], prefix: str) -> dict[str, str]:
    """``{checkpoint key: key in the model's naming}``, adding or stripping ``base_model_prefix``
    the way ``transformers`` does (a ``BertModel`` checkpoint has no ``bert.`` prefix)."""
    p = prefix + "."
    model_prefixed = any(k.startswith(p) for k in model_keys)
    ckpt_prefixed = any(k.startswith(p) for k in keys)
    if model_prefixed and not ckpt_prefixed:
        return {k: p + k for k in keys}
    if ckpt_prefixed and not model_prefixed:
        return {k: k[len(p) :] if k.startswith(p) else k for k in keys}
    return {k: k for k in keys}


def state_dict_to_params(
    state: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    base_model_prefix: str,
    head_prefixes: tuple[str, ...] = (),
    ignore_hf_keys: tuple[str, ...] = (),
    tied: tuple[tuple[str, str], ...] = (),
    init_if_missing: tuple[str, ...] = (),
    source: str = "checkpoint",
) -> tuple[dict[str, Any], MatchReport]:
    """A Hugging Face (PyTorch-named) state dict -> our parameter tree shaped like ``expected``.

    Args:
      state: ``{hf key: array}`` (NumPy or anything ``np.asarray`` takes; PyTorch layout).
      expected: the model's parameter tree of shapes (``jax.eval_shape`` of ``init``, without the
        ``{"params": ...}`` wrapper); leaves need ``.shape``.
      base_model_prefix, head_prefixes, ignore_hf_keys, tied, init_if_missing: as in
        :class:`sora_jax.models.common.ModelFamily`. A checkpoint key matching ``ignore_hf_keys`` is
        skipped unless the model has it; checkpoint keys of a head the model lacks are dropped.
      source: names the checkpoint in error messages.

    Returns:
      ``(params, report)``: ``params`` holds every expected leaf except the head leaves listed in
      ``report.initialized`` (the caller initialises those).

    Raises:
      CheckpointMismatchError: listing every missing key, unexpected key and wrong shape.
    """
    by_hf = {hf_key(p): (p, leaf) for p, leaf in iter_paths(expected)}
    keys = list(state)
    renamed = {k: rename_legacy(k) for k in keys}
    adjusted = _adjust_prefix(list(renamed.values()), set(by_hf), base_model_prefix)
    ignore = [re.compile(r) for r in ignore_hf_keys]
    heads = tuple(head_prefixes)
    model_heads = {p[0] for p, _ in iter_paths(expected) if p[0] in heads}
    params: dict[str, Any] = {}
    report = MatchReport()
    problems: list[str] = []
    seen: set[str] = set()
    for k in keys:
        name = adjusted[renamed[k]]
        if name in by_hf:
            path, leaf = by_hf[name]
            value = hf_layout(path, np.asarray(state[k]))
            if tuple(value.shape) != tuple(leaf.shape):
                want = tuple(hf_layout(path, np.empty(leaf.shape, np.int8)).shape)
                hint = (
                    "a task head: pass num_labels equal to the checkpoint's, or load a base checkpoint"
                    if path[0] in heads
                    else "is the config.json the checkpoint's own?"
                )
                problems.append(
                    f"shape mismatch for {k!r}: checkpoint {tuple(np.shape(state[k]))}, model expects {want} "
                    f"(our {'/'.join(path)} {tuple(leaf.shape)}); {hint}"
                )
            seen.add(name)
            set_path(params, path, value)
        elif any(r.search(k) or r.search(name) for r in ignore):
            report.ignored.append(k)
        elif name.split(".")[0] in heads and name.split(".")[0] not in model_heads:
            report.dropped_heads.append(k)
        else:
            problems.append(f"unexpected key {k!r} (no parameter {name!r} in the model)")
    tied_map = dict(tied)
    loaded = dict(iter_paths(params))
    for name, (path, leaf) in sorted(by_hf.items()):
        if name in seen:
            continue
        joined = "/".join(path)
        src = loaded.get(tuple(tied_map.get(joined, "").split("/")))
        if src is not None:
            # a tied parameter (an output embedding): the source, transposed when the layouts differ
            value = src if tuple(src.shape) == tuple(leaf.shape) else np.swapaxes(src, -1, -2)
            set_path(params, path, value)
            report.tied.append(joined)
        elif path[0] in heads or any(joined == q or joined.startswith(q + "/") for q in init_if_missing):
            report.initialized.append(joined)
        else:
            problems.append(f"missing key {name!r} (our {joined})")
    if problems:
        raise CheckpointMismatchError(problems, source)
    return params, report
