"""The public adapter API over any parameter pytree: ``init_adapter``, ``apply_adapter``, ``merge``.

A *module* is the parent of a leaf named ``kernel``; its path is the ``/``-joined pytree keys
(dict keys, attribute names, sequence indices), so Flax linen/NNX state, Equinox modules and plain
nested dicts all work. Kernels are ``W: (d_in, d_out)``; kernels with leading stacked axes
``(..., d_in, d_out)`` (scanned layers) are adapted slice by slice with ``jax.vmap``. A sibling leaf
named ``bias`` (``(..., d_out)``) is conditioned as SPEC section 2 says.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from sora_jax import methods
from sora_jax.config import AdapterConfig, AdapterError

Array = jax.Array
PyTree = Any


# -- the Adapter pytree -------------------------------------------------------------------------
@jax.tree_util.register_pytree_with_keys_class
class Adapter:
    """Adapter state: ``config`` (static) and ``layers``, ``{module path: {leaf name: array}}``.

    Leaves per module (SPEC section 2): ``A (d_in, r)``, ``B (r, d_out)`` and, where the method has
    them, ``m (d_out,)``, ``d (d_out,)``, ``C (d_out, r_p)``, ``D (d_out, r_p)`` (with the kernel's
    leading stacked axes in front). A registered pytree: ``jax.tree``, optax and orbax act on it.
    """

    def __init__(self, config: AdapterConfig, layers: dict[str, dict[str, Array]]):
        self.config = config
        self.layers = layers

    def tree_flatten_with_keys(self):
        return ((GetAttrKey("layers"), self.layers),), self.config

    @classmethod
    def tree_unflatten(cls, config: AdapterConfig, children) -> Adapter:
        return cls(config, children[0])

    def __repr__(self) -> str:
        shapes = {p: {k: tuple(getattr(v, "shape", ())) for k, v in lv.items()} for p, lv in self.layers.items()}
        return f"Adapter(method={self.config.method!r}, layers={len(self.layers)}, shapes={shapes})"


# -- finding modules in a pytree ----------------------------------------------------------------
def _key_str(k: Any) -> str:
    if isinstance(k, DictKey):
        return str(k.key)
    if isinstance(k, GetAttrKey):
        return k.name
    if isinstance(k, SequenceKey):
        return str(k.idx)
    if isinstance(k, FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(keypath: Iterable[Any]) -> tuple[str, ...]:
    """A ``jax.tree_util`` key path as a tuple of strings."""
    return tuple(_key_str(k) for k in keypath)


@dataclass(frozen=True)
class Module:
    """A module found in a parameter tree: its path and its kernel/bias leaves (or shape structs)."""

    path: str
    kernel: Any
    bias: Any | None


def find_modules(params: PyTree) -> dict[str, Module]:
    """Every module (parent of a ``kernel`` leaf) in ``params``, keyed by its ``/``-joined path."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels: dict[str, Any] = {}
    biases: dict[str, Any] = {}
    for keypath, leaf in leaves:
        parts = path_str(keypath)
        if not parts:
            continue
        parent = "/".join(parts[:-1])
        if parts[-1] == "kernel":
            kernels[parent] = leaf
        elif parts[-1] == "bias":
            biases[parent] = leaf
    return {p: Module(p, k, biases.get(p)) for p, k in kernels.items()}


def _listing(paths: Iterable[str], n: int = 12) -> str:
    paths = sorted(paths)
    head = ", ".join(paths[:n])
    return head + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


def select_modules(params: PyTree, config: AdapterConfig) -> dict[str, Module]:
    """The modules ``config`` targets, validated (clear errors before any computation)."""
    modules = find_modules(params)
    if not modules:
        raise AdapterError(
            "no leaf named 'kernel' found in params; sora_jax adapts modules whose weight matrix is a "
            "leaf named 'kernel' of shape (d_in, d_out) (Flax convention)"
        )
    if config.target_modules is None:
        raise AdapterError(
            f"target_modules is not set; set it to module names or a regex. Available modules: "
            f"{_listing(modules)}"
        )
    chosen = {p: m for p, m in modules.items() if config.targets(p)}
    if not chosen:
        raise AdapterError(
            f"target_modules={config.target_modules!r} matches no kernel in params. "
            f"Available module paths: {_listing(modules)}"
        )
    for p, m in chosen.items():
        shape = tuple(m.kernel.shape)
        if len(shape) < 2:
            raise AdapterError(
                f"module {p!r} is selected but its kernel has shape {shape}, not a matrix (d_in, d_out); "
                f"exclude it with exclude_modules or narrow target_modules"
            )
        d_in, d_out = shape[-2:]
        r = config.rank_for(p)
        if r > min(d_in, d_out):
            raise AdapterError(
                f"rank r={r} is larger than min(d_in, d_out)={min(d_in, d_out)} for module {p!r} with kernel "
                f"{shape}; use a smaller r or a rank_pattern entry for this module"
            )
        if config.has_rotation and 2 * config.rotation_rank > d_out:
            raise AdapterError(
                f"rotation_rank={config.rotation_rank} is too large for module {p!r} (d_out={d_out}): the "
                f"rotation generator has rank 2*rotation_rank, which must be <= d_out; lower rotation_rank"
            )
        if m.bias is not None and tuple(m.bias.shape) != (*shape[:-2], d_out):
            raise AdapterError(
                f"module {p!r}: bias shape {tuple(m.bias.shape)} does not match kernel {shape} "
                f"(expected {(*shape[:-2], d_out)})"
            )
    return chosen


def expected_shapes(config: AdapterConfig, path: str, kernel_shape: tuple[int, ...]) -> dict[str, tuple]:
    """Shapes of the adapter leaves of the module at ``path`` with a kernel of ``kernel_shape``."""
    *lead, d_in, d_out = kernel_shape
    lead = tuple(lead)
    r = config.rank_for(path)
    shapes = {"A": (*lead, d_in, r), "B": (*lead, r, d_out)}
    if config.has_magnitude:
        shapes["m"] = (*lead, d_out)
    if config.has_diag:
        shapes["d"] = (*lead, d_out)
    if config.has_rotation:
        shapes["C"] = shapes["D"] = (*lead, d_out, config.rotation_rank)
    return shapes


def _vmapped(fn: Callable, n_lead: int) -> Callable:
    for _ in range(n_lead):
        fn = jax.vmap(fn)
    return fn


# -- init ---------------------------------------------------------------------------------------
def init_adapter(key: Array, params: PyTree, config: AdapterConfig, dtype: Any = jnp.float32) -> Adapter:
    """Adapter leaves for every module ``config`` targets (SPEC section 2 initialisations).

    Each module's key is ``fold_in(key, crc32(path))``, so a module's initial values do not depend on
    which other modules are targeted. At init the adapted model equals the frozen one.
    """
    chosen = select_modules(params, config)
    layers = {}
    for path, mod in sorted(chosen.items()):
        shape = tuple(mod.kernel.shape)
        lead = shape[:-2]
        k = jax.random.fold_in(key, zlib.crc32(path.encode()))
        r = config.rank_for(path)
        fn = _vmapped(lambda kk, W, r=r: methods.init_leaves(kk, W, config, r, dtype), len(lead))
        keys = jax.random.split(k, math.prod(lead)).reshape(*lead, *k.shape) if lead else k
        layers[path] = fn(keys, jnp.asarray(mod.kernel))
    return Adapter(config, layers)


# -- apply / merge ------------------------------------------------------------------------------
def check_compatible(params: PyTree, adapter: Adapter) -> dict[str, Module]:
    """Check that ``adapter`` fits ``params`` (every path present, every shape right)."""
    modules = find_modules(params)
    problems = []
    for path, leaves in adapter.layers.items():
        mod = modules.get(path)
        if mod is None:
            problems.append(f"{path!r}: no such module (no 'kernel' leaf at that path) in params")
            continue
        expected = expected_shapes(adapter.config, path, tuple(mod.kernel.shape))
        if set(leaves) != set(expected):
            problems.append(f"{path!r}: leaves {sorted(leaves)} but {adapter.config.method} needs {sorted(expected)}")
            continue
        for name, shp in expected.items():
            got = tuple(leaves[name].shape)
            if got != shp:
                problems.append(
                    f"{path!r}: leaf {name} has shape {got}, but the kernel {tuple(mod.kernel.shape)} needs {shp}"
                )
    if problems:
        raise AdapterError(
            "adapter does not fit these params (was it initialised for another model?): "
            + "; ".join(problems)
            + ". Re-create it with init_adapter(key, params, config) for these params."
        )
    return {p: modules[p] for p in adapter.layers}


def effective_weights(
    params: PyTree, adapter: Adapter, compute_dtype: Any = None
) -> dict[str, tuple[Array, Array | None]]:
    """``{path: (W', b')}`` for every adapted module, in ``compute_dtype`` (default: the kernel's)."""
    modules = check_compatible(params, adapter)
    out = {}
    for path, mod in modules.items():
        W = jnp.asarray(mod.kernel)
        b = None if mod.bias is None else jnp.asarray(mod.bias)
        dt = compute_dtype or jnp.promote_types(W.dtype, adapter.layers[path]["A"].dtype)
        W = W.astype(dt)
        b = None if b is None else b.astype(dt)
        s = adapter.config.scaling_for(path)
        n_lead = W.ndim - 2
        if b is None:
            fn = _vmapped(lambda W_, lv, s=s: methods.effective(W_, None, lv, adapter.config, s), n_lead)
            out[path] = fn(W, adapter.layers[path])
        else:
            fn = _vmapped(lambda W_, b_, lv, s=s: methods.effective(W_, b_, lv, adapter.config, s), n_lead)
            out[path] = fn(W, b, adapter.layers[path])
    return out


def _replace(params: PyTree, new: dict[str, tuple[Array, Array | None]]) -> PyTree:
    def swap(keypath, leaf):
        parts = path_str(keypath)
        parent, name = "/".join(parts[:-1]), parts[-1]
        if parent in new and name in ("kernel", "bias"):
            W, b = new[parent]
            value = W if name == "kernel" else b
            return value.astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(swap, params)


def apply_adapter(params: PyTree, adapter: Adapter) -> PyTree:
    """The effective parameters: every adapted kernel ``W -> W'`` and bias ``b -> b'`` (SPEC section 2).

    Same tree structure as ``params``; untargeted leaves are passed through untouched; differentiable
    w.r.t. the adapter. Each new leaf keeps the original leaf's dtype.
    """
    return _replace(params, effective_weights(params, adapter))


def merge(params: PyTree, adapter: Adapter) -> PyTree:
    """``apply_adapter`` computed in float32 and cast back to each leaf's dtype (SPEC section 3)."""
    return _replace(params, effective_weights(params, adapter, compute_dtype=jnp.float32))


# -- counting -----------------------------------------------------------------------------------
def _size(x: Any) -> int:
    return math.prod(getattr(x, "shape", ()))


def saved_leaves(params: PyTree, config: AdapterConfig) -> list[tuple[str, Any]]:
    """``(path, leaf)`` of the params trained in full (``modules_to_save``: a module or any ancestor)."""
    out = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = path_str(keypath)
        if any(config.saves("/".join(parts[:i])) for i in range(1, len(parts))):
            out.append(("/".join(parts), leaf))
    return out


def trainable_parameters(params: PyTree, adapter: Adapter, verbose: bool = False) -> dict[str, float]:
    """Counts as PEFT's ``print_trainable_parameters`` reports them.

    ``trainable`` = adapter leaves + params under ``modules_to_save``; ``total`` = all params +
    adapter leaves; ``percent = 100 * trainable / total``. Works on ``jax.ShapeDtypeStruct`` trees.
    """
    adapter_n = sum(_size(x) for x in jax.tree.leaves(adapter))
    saved_n = sum(_size(x) for _, x in saved_leaves(params, adapter.config))
    base_n = sum(_size(x) for x in jax.tree.leaves(params))
    trainable = adapter_n + saved_n
    total = base_n + adapter_n
    out = {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total}
    if verbose:
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {out['percent']:.4f}")
    return out
