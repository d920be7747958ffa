"""The public adapter API over any parameter pytree: ``init_adapter``, ``apply_adapter``, ``merge``.

A *module* is the parent of a weight leaf (``AdapterConfig.weight_leaves``: ``kernel`` ``(d_in, d_out)``,
Flax; ``weight`` ``(d_out, d_in)``, PyTorch and Equinox); its path is the ``/``-joined pytree keys (dict
keys, attribute names, sequence indices; see :func:`path_str`), so Flax linen and NNX state, Equinox
modules, PyTorch-named state dicts and plain nested dicts all work. Each weight is read as a matrix
``W: (*stacked, d_in, d_out)`` (:mod:`sora_jax.layout`: ``DenseGeneral`` kernels over several feature
axes are one matrix; stacked, scanned layers are adapted slice by slice with ``jax.vmap``); a sibling
bias leaf (``bias``) is conditioned as docs/spec.md section 2 says. Every result has the params' own structure,
shapes and dtypes.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from sora_jax import layout, methods
from sora_jax.config import DEFAULT_WEIGHT_LEAVES, AdapterConfig, AdapterError
from sora_jax.layout import Layout

Array = jax.Array
PyTree = Any


# -- the Adapter pytree -------------------------------------------------------------------------
@jax.tree_util.register_pytree_with_keys_class
class Adapter:
    """Adapter state: ``config`` (static) and ``layers``, ``{module path: {leaf name: array}}``.

    Leaves per module (docs/spec.md section 2): ``A (d_in, r)``, ``B (r, d_out)`` and, where the method has
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
    """A ``jax.tree_util`` key path as a tuple of strings.

    Dict keys holding dots are split at them (a PyTorch state dict's ``"encoder.layer.0.query.weight"``
    reads as ``encoder/layer/0/query/weight``), and a trailing ``.value`` attribute (a Flax NNX
    ``Variable`` in an ``nnx.State``) is dropped, so a leaf's path is the same in every container."""
    keypath = list(keypath)
    if keypath and isinstance(keypath[-1], GetAttrKey) and keypath[-1].name == "value":
        keypath = keypath[:-1]
    parts: list[str] = []
    for k in keypath:
        s = _key_str(k)
        parts.extend(s.split(".") if isinstance(k, DictKey) and "." in s else [s])
    return tuple(parts)


@dataclass(frozen=True)
class Module:
    """A module found in a parameter tree: its path, its weight and bias leaves (arrays or shape structs)
    as stored, the weight leaf's name and its feature order (``"io"``/``"oi"``, ``AdapterConfig.weight_leaves``),
    the bias leaf's name and, once resolved for a config, its :class:`~sora_jax.layout.Layout`."""

    path: str
    kernel: Any
    bias: Any | None
    weight_name: str = "kernel"
    order: str = "io"
    bias_name: str = "bias"
    layout: Layout | None = None


def find_modules(params: PyTree, config: AdapterConfig | None = None) -> dict[str, Module]:
    """Every module (parent of a weight leaf, ``config.weight_leaves``; default ``kernel`` and ``weight``) in
    ``params``, keyed by its ``/``-joined path. Leaves without a shape (an Equinox module's functions) are
    skipped. Layouts are not resolved here (:func:`select_modules` does it for the selected modules)."""
    weight_leaves = dict(config.weight_leaves if config is not None else DEFAULT_WEIGHT_LEAVES)
    bias_name = config.bias_leaf if config is not None else "bias"
    rank = {name: k for k, name in enumerate(weight_leaves)}
    kernels: dict[str, tuple[str, Any]] = {}
    biases: dict[str, Any] = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = path_str(keypath)
        if not parts or not hasattr(leaf, "shape"):
            continue
        parent, name = "/".join(parts[:-1]), parts[-1]
        if name in weight_leaves:
            if parent not in kernels or rank[name] < rank[kernels[parent][0]]:
                kernels[parent] = (name, leaf)
        elif name == bias_name:
            biases[parent] = leaf
    return {
        p: Module(p, leaf, biases.get(p), name, weight_leaves[name], bias_name) for p, (name, leaf) in kernels.items()
    }


def resolve_layout(mod: Module, config: AdapterConfig) -> Module:
    """``mod`` with its :class:`~sora_jax.layout.Layout` (declared in ``config.kernel_axes`` or read off
    the weight and bias shapes); raises :class:`AdapterError` where the shape is ambiguous."""
    bias_shape = None if mod.bias is None else tuple(mod.bias.shape)
    lay = layout.resolve(mod.path, mod.weight_name, mod.order, tuple(mod.kernel.shape), bias_shape, config)
    return replace(mod, layout=lay)


def _listing(paths: Iterable[str], n: int = 12) -> str:
    paths = sorted(paths)
    head = ", ".join(paths[:n])
    return head + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


def select_modules(params: PyTree, config: AdapterConfig) -> dict[str, Module]:
    """The modules ``config`` targets, with their layouts, validated (clear errors before any computation)."""
    modules = find_modules(params, config)
    if not modules:
        names = ", ".join(
            f"{n!r} {'(d_in, d_out)' if o == 'io' else '(d_out, d_in)'}" for n, o in config.weight_leaves
        )
        raise AdapterError(
            f"no weight leaf found in params: sora_jax adapts modules whose weight is a leaf named {names} "
            f"(a sibling {config.bias_leaf!r} its bias); name yours with AdapterConfig(weight_leaves={{'w': 'io'}}, "
            f"bias_leaf='b') (a Flax NNX model: pass nnx.split(model)[1] or nnx.state(model))"
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
    out = {}
    for p, m in sorted(chosen.items()):
        m = resolve_layout(m, config)
        lay = m.layout
        d_in, d_out = lay.d_in, lay.d_out
        r = config.rank_for(p)
        if r > min(d_in, d_out):
            raise AdapterError(
                f"rank r={r} is larger than min(d_in, d_out)={min(d_in, d_out)} for module {p!r} with "
                f"{m.weight_name} {lay.shape} (read as {layout.describe(lay)}); use a smaller r or a "
                f"rank_pattern entry for this module"
            )
        method = methods.get(config)
        for cmap in (method.pre, method.post):
            problem = cmap.check(d_out, config)
            if problem is not None:
                raise AdapterError(problem.format(path=p))
        out[p] = m
    return out


def expected_shapes(config: AdapterConfig, path: str, matrix_shape: tuple[int, ...]) -> dict[str, tuple]:
    """Shapes of the adapter leaves of the module at ``path`` whose weight reads as ``matrix_shape``
    ``(*stacked, d_in, d_out)`` (:attr:`sora_jax.layout.Layout.matrix_shape`)."""
    *lead, d_in, d_out = matrix_shape
    shapes = methods.get(config).leaf_shapes(d_in, d_out, config.rank_for(path), config)
    return {name: (*lead, *shape) for name, shape in shapes.items()}


def vmap_lead(fn: Callable, n_lead: int) -> Callable:
    """``fn`` vmapped over ``n_lead`` leading axes of every argument (a stacked kernel's layer axes)."""
    for _ in range(n_lead):
        fn = jax.vmap(fn)
    return fn


# -- init ---------------------------------------------------------------------------------------
def init_adapter(key: Array, params: PyTree, config: AdapterConfig, dtype: Any = jnp.float32) -> Adapter:
    """Adapter leaves for every module ``config`` targets (docs/spec.md section 2 initialisations).

    ``params``: any pytree (nested dicts, a Flax NNX ``State``, an Equinox module, a PyTorch-named state
    dict). Each module's key is :func:`module_key` ``(key, path)``, so a module's initial values do not
    depend on which other modules are targeted, and a stacked module (scanned layers) draws for its block
    ``i`` what the unrolled model's module of layer ``i`` draws. At init the adapted model equals the frozen
    one.
    """
    chosen = select_modules(params, config)
    layers = {}
    for path, mod in sorted(chosen.items()):
        lead = mod.layout.lead
        r = config.rank_for(path)
        fn = vmap_lead(lambda kk, W, r=r: methods.init_leaves(kk, W, config, r, dtype), len(lead))
        layers[path] = fn(_fold_grid(module_key(key, path), lead), mod.layout.to_matrix(jnp.asarray(mod.kernel)))
    return Adapter(config, layers)


_NUMBERED = re.compile(r"^(?:(.*)_)?(\d+)$")


def module_key(key: Array, path: str) -> Array:
    """The key of the module at ``path``: ``fold_in(key, crc32(canonical))`` and then each layer number, where
    the canonical path writes a numbered component ``name_N`` as ``name`` (and drops a bare ``N``, a
    PyTorch-style ``layers/3``) and the numbers are folded in order. So the module of layer 3 of an unrolled
    stack (``model/layers_3/self_attn/q_proj``) has the key of block 3 of the stacked module
    (``model/layers/self_attn/q_proj``, whose blocks fold in their index after the path's own numbers)."""
    parts, numbers = [], []
    for part in path.split("/"):
        m = _NUMBERED.match(part)
        if m is None:
            parts.append(part)
            continue
        if m.group(1):
            parts.append(m.group(1))
        numbers.append(int(m.group(2)))
    k = jax.random.fold_in(key, zlib.crc32("/".join(parts).encode()))
    for n in numbers:
        k = jax.random.fold_in(k, n)
    return k


def _fold_grid(key: Array, lead: tuple[int, ...]) -> Array:
    """``(*lead, *key.shape)`` keys: index ``(i, j, ...)`` holds ``fold_in(fold_in(key, i), j) ...``."""
    if not lead:
        return key
    return jax.vmap(lambda i: _fold_grid(jax.random.fold_in(key, i), lead[1:]))(jnp.arange(lead[0]))


# -- apply / merge ------------------------------------------------------------------------------
def check_compatible(params: PyTree, adapter: Adapter) -> dict[str, Module]:
    """Check that ``adapter`` fits ``params`` (every path present, every shape right); the adapted modules
    with their layouts."""
    modules = find_modules(params, adapter.config)
    problems = []
    out = {}
    for path, leaves in adapter.layers.items():
        mod = modules.get(path)
        if mod is None:
            problems.append(f"{path!r}: no such module (no weight leaf at that path) in params")
            continue
        try:
            mod = out[path] = resolve_layout(mod, adapter.config)
        except AdapterError as e:
            problems.append(str(e))
            continue
        expected = expected_shapes(adapter.config, path, mod.layout.matrix_shape)
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
    return out


def effective_matrices(
    params: PyTree, adapter: Adapter, compute_dtype: Any = None
) -> dict[str, tuple[Module, Array, Array | None]]:
    """``{path: (module, W', b')}`` with ``W': (*stacked, d_in, d_out)`` and ``b': (*stacked, d_out)``, the
    matrix view of each adapted module (:mod:`sora_jax.layout`), in ``compute_dtype`` (default: the
    kernel's and the adapter's promoted)."""
    modules = check_compatible(params, adapter)
    out = {}
    for path, mod in modules.items():
        lay = mod.layout
        W = lay.to_matrix(jnp.asarray(mod.kernel))
        b = None if mod.bias is None else lay.bias_to_vector(jnp.asarray(mod.bias))
        dt = compute_dtype or jnp.promote_types(W.dtype, adapter.layers[path]["A"].dtype)
        W = W.astype(dt)
        b = None if b is None else b.astype(dt)
        s = adapter.config.scaling_for(path)
        n_lead = W.ndim - 2
        if b is None:
            fn = vmap_lead(lambda W_, lv, s=s: methods.effective(W_, None, lv, adapter.config, s), n_lead)
            out[path] = (mod, *fn(W, adapter.layers[path]))
        else:
            fn = vmap_lead(lambda W_, b_, lv, s=s: methods.effective(W_, b_, lv, adapter.config, s), n_lead)
            out[path] = (mod, *fn(W, b, adapter.layers[path]))
    return out


def effective_weights(
    params: PyTree, adapter: Adapter, compute_dtype: Any = None
) -> dict[str, tuple[Array, Array | None]]:
    """``{path: (W', b')}`` for every adapted module, each in its leaf's own shape, in ``compute_dtype``
    (default: the kernel's and the adapter's promoted)."""
    return {
        p: (mod.layout.from_matrix(W), None if b is None else mod.layout.bias_from_vector(b))
        for p, (mod, W, b) in effective_matrices(params, adapter, compute_dtype).items()
    }


def _replace(params: PyTree, adapter: Adapter, compute_dtype: Any = None) -> PyTree:
    new = effective_matrices(params, adapter, compute_dtype)

    def swap(keypath, leaf):
        parts = path_str(keypath)
        parent, name = "/".join(parts[:-1]), parts[-1]
        if parent in new:
            mod, W, b = new[parent]
            if name == mod.weight_name:
                return mod.layout.from_matrix(W).astype(leaf.dtype)
            if name == mod.bias_name and b is not None:
                return mod.layout.bias_from_vector(b).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(swap, params)


def apply_adapter(params: PyTree, adapter: Adapter) -> PyTree:
    """The effective parameters: every adapted weight ``W -> W'`` and bias ``b -> b'`` (docs/spec.md section 2).

    Same tree structure as ``params`` (a dict, an NNX ``State``, an Equinox module); untargeted leaves are
    passed through untouched; differentiable w.r.t. the adapter. Each new leaf keeps the original leaf's
    dtype and shape.
    """
    return _replace(params, adapter)


def merge(params: PyTree, adapter: Adapter) -> PyTree:
    """``apply_adapter`` computed in float32 and cast back to each leaf's dtype (docs/spec.md section 3)."""
    return _replace(params, adapter, compute_dtype=jnp.float32)


# -- counting -----------------------------------------------------------------------------------
def _size(x: Any) -> int:
    """Elements of an array leaf; 0 for a leaf without a shape (an Equinox module's functions)."""
    return math.prod(x.shape) if hasattr(x, "shape") else 0


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
