"""Data and model parallelism with ``jax.sharding``: a mesh, and where each array lives on it.

The mesh has a ``data`` axis (the batch is split along it) and an optional ``model`` axis that
shards the frozen base kernels ``W: (d_in, d_out)``: along ``d_out`` (``P(None, "model")``) when
``d_out`` is a multiple of the axis size, else along ``d_in`` (``P("model", None)``) when that is,
else replicated. A bias ``(d_out,)`` follows its kernel's ``d_out``. Embeddings, norms and other
leaves are replicated.

Adapter factors are either replicated or sharded consistently with their base kernel
(``shard=True``): with the kernel split along ``d_out``, the leaves with a ``d_out`` axis
(``B (r, d_out)``, ``m, d (d_out,)``, ``C, D (d_out, r_p)``) are split along it and ``A (d_in, r)`` is
replicated; with the kernel split along ``d_in``, ``A`` is split along ``d_in`` and the rest replicated.

Everything is placed with ``jax.device_put`` + ``NamedSharding`` and the steps are plain ``jax.jit``
functions: XLA's sharding propagation inserts the collectives (no ``shard_map``). The mesh axes are
``AxisType.Auto``.

Multi-host: call ``jax.distributed.initialize()`` (coordinator address, process count and id from
the cluster environment, or passed explicitly) at the start of every process, before any other JAX
call; ``jax.devices()`` then lists the devices of all hosts and :func:`make_mesh` spans them. Each
process feeds the same global batch here (``shard_batch`` uses ``jax.device_put``, which places the
local shards); see the JAX multi-process guide for per-host data loading
(``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sora_jax import methods
from sora_jax.adapter import Adapter, find_modules, path_str

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"data=4,model=2"`` (or a mapping) -> ``{"data": 4, "model": 2}``; ``None``/``""`` -> ``{}``."""
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        items = []
        for part in str(spec).split(","):
            name, sep, value = part.strip().partition("=")
            if not sep:
                raise ValueError(f"mesh spec {spec!r}: entry {part!r} is not name=size (e.g. 'data=4,model=2')")
            items.append((name.strip(), value.strip()))
    out: dict[str, int] = {}
    for name, value in items:
        if name not in AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {', '.join(AXES)}")
        try:
            size = int(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"mesh spec {spec!r}: size of {name!r} must be a positive integer, got {value!r}"
            ) from None
        if size < 1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be a positive integer, got {size}")
        out[name] = size
    return out


def make_mesh(spec: str | Mapping[str, int] | None, devices: Sequence[Any] | None = None) -> Mesh | None:
    """A ``Mesh`` with axes ``("data", "model")`` from ``spec`` (missing axes have size 1).

    ``None``/``""`` -> ``None`` (no mesh: run on the default device). The axis sizes must multiply to
    at most the device count (the first devices are used).
    """
    sizes = parse_mesh(spec)
    if not sizes:
        return None
    devices = list(jax.devices() if devices is None else devices)
    shape = (sizes.get(DATA, 1), sizes.get(MODEL, 1))
    need = shape[0] * shape[1]
    if need > len(devices):
        raise ValueError(
            f"mesh {dict(zip(AXES, shape, strict=True))} needs {need} devices but only {len(devices)} are "
            f"available ({devices[0].platform}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={need} "
            f"before importing jax"
        )
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[:need])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _model_size(mesh: Mesh) -> int:
    return int(dict(mesh.shape).get(MODEL, 1))


def kernel_axis(shape: Sequence[int], model_size: int) -> str | None:
    """Which axis of a kernel ``(..., d_in, d_out)`` the ``model`` axis splits: ``"out"``, ``"in"`` or
    ``None`` (replicated)."""
    if model_size <= 1 or len(shape) < 2:
        return None
    if shape[-1] % model_size == 0:
        return "out"
    if shape[-2] % model_size == 0:
        return "in"
    return None


def _spec(ndim: int, axis: int | None) -> P:
    """A ``PartitionSpec`` splitting dimension ``axis`` (negative ok) along ``model``."""
    if axis is None:
        return P()
    dims: list[str | None] = [None] * ndim
    dims[axis] = MODEL
    return P(*dims)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """A ``NamedSharding`` per leaf of ``params`` (same tree): kernels split along the ``model`` axis as
    the module docstring says, biases with their kernel's ``d_out``, the rest replicated."""
    m = _model_size(mesh)
    modules = find_modules(params)
    axes = {p: kernel_axis(tuple(mod.kernel.shape), m) for p, mod in modules.items()}

    def leaf(keypath: Sequence[Any], x: Any) -> NamedSharding:
        parts = path_str(keypath)
        parent, name = "/".join(parts[:-1]), parts[-1]
        ax = axes.get(parent)
        ndim = len(np.shape(x))
        if name == "kernel" and ax is not None:
            return NamedSharding(mesh, _spec(ndim, -1 if ax == "out" else -2))
        if name == "bias" and ax == "out" and ndim >= 1:
            return NamedSharding(mesh, _spec(ndim, -1))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(leaf, params)


_IN_AXIS = {"A": -2}  # the leaf with a d_in axis (from the end)


def _out_axes(adapter: Adapter) -> dict[str, int]:
    """The axis of each adapter leaf that is ``d_out``, from the end: ``B``'s last, and for the conditioning
    maps' leaves their first per-matrix axis (``m, d (d_out,)``, ``C, D (d_out, r_p)``)."""
    cfg = adapter.config
    shapes = methods.get(cfg).leaf_shapes(1, 1, 1, cfg)
    return {name: (-1 if name == "B" else -len(shape)) for name, shape in shapes.items() if name != "A"}


def adapter_shardings(adapter: Adapter, params: Any, mesh: Mesh, shard: bool = True) -> Adapter:
    """An ``Adapter``-shaped tree of ``NamedSharding``: each module's factors split consistently with
    its base kernel in ``params`` (``shard=True``, see the module docstring), or all replicated."""
    m = _model_size(mesh)
    modules = find_modules(params)
    layers: dict[str, dict[str, NamedSharding]] = {}
    for path, leaves in adapter.layers.items():
        ax = kernel_axis(tuple(modules[path].kernel.shape), m) if shard and path in modules else None
        table = _out_axes(adapter) if ax == "out" else _IN_AXIS if ax == "in" else {}
        layers[path] = {name: NamedSharding(mesh, _spec(np.ndim(v), table.get(name))) for name, v in leaves.items()}
    return Adapter(adapter.config, layers)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Split dimension 0 (the batch) along ``data``."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, multiple: int = 1) -> dict[str, jax.Array]:
    """Place a batch of arrays ``(B, ...)`` on ``mesh``, split along ``data``. ``B`` must be a multiple
    of ``data size * multiple`` (``multiple``: gradient-accumulation micro-batches)."""
    data = int(dict(mesh.shape).get(DATA, 1))
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.shape[0] % (data * multiple):
            raise ValueError(
                f"batch size {v.shape[0]} ({k!r}) is not a multiple of the mesh's data axis ({data})"
                + (f" times grad_accum ({multiple})" if multiple > 1 else "")
                + "; choose a batch size divisible by it"
            )
        out[k] = jax.device_put(v, batch_sharding(mesh, v.ndim))
    return out
