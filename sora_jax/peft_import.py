"""Adapters trained elsewhere, read into sora-jax: PEFT LoRA/DoRA directories and the authors' SORA state dicts.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``, read with ``torch.load(weights_only=True)``). Its keys (PyTorch layout, docs/spec.md
section 1) become adapter leaves:

| key (after ``base_model.model.<module>.``) | leaf | layout |
|---|---|---|
| ``lora_A.weight (r, d_in)`` | ``A (d_in, r)`` | transpose |
| ``lora_B.weight (d_out, r)`` | ``B (r, d_out)`` | transpose |
| ``lora_magnitude_vector (d_out,)`` (DoRA) | ``m (d_out,)`` | same |
| ``lora_C.weight``, ``lora_D.weight (d_out, r_p)`` (SORA) | ``C``, ``D (d_out, r_p)`` | same |
| ``lora_Diag.weight (d_out, 1)`` (SORA) | ``d (d_out,)`` | squeeze |

Any other key is a full parameter (``modules_to_save``: a trained head; PEFT's ``bias="all"``) and is
returned in the parameter tree. The config's ``r``/``rank_pattern``, ``lora_alpha``/``alpha_pattern``
(PEFT's matching: a pattern matches a module name that ends with it after a ``.``), ``use_rslora``,
``lora_dropout`` and (SORA) ``initial_s_p`` give each module's scale; the ranks are checked against the
tensors. A ``lora_C``/``lora_D``/``lora_Diag`` key (the authors' PEFT fork, docs/spec.md section 2: ``y = (d * (x W^T +
b) + s x A^T B^T) R``) makes the method ``sora``, ``r_p`` read off ``lora_C``.

PEFT module names become our module paths through the conversion table (:mod:`sora_jax.convert`) for a
:class:`~sora_jax.hub.PretrainedModel`, and through ``key_map`` (default: dots become ``/``) for any other
parameter tree.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import convert
from sora_jax.adapter import Adapter, check_compatible, find_modules, path_str, resolve_layout
from sora_jax.config import DEFAULT_WEIGHT_LEAVES, AdapterConfig, AdapterError

__all__ = ["LoadedAdapter", "load_peft_adapter", "peft_pattern_key"]

CONFIG_NAME = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# adapter key suffix -> (leaf, transpose / squeeze)
_FACTORS = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_magnitude_vector": "m",
    "lora_magnitude_vector.weight": "m",
    "lora_C.weight": "C",
    "lora_D.weight": "D",
    "lora_Diag.weight": "d",
}
# PEFT options that change what the factors mean; loading them as plain LoRA would be silently wrong
_UNSUPPORTED = {
    "lora_bias": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
}


class LoadedAdapter(NamedTuple):
    """What :func:`load_peft_adapter` returns: the ``adapter`` and ``params``, the parameter tree given
    with the adapter file's full parameters (``modules_to_save``, a trained head) written in."""

    adapter: Adapter
    params: Any


def peft_pattern_key(patterns: Mapping[str, Any], name: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key that applies to the PEFT module ``name`` (PEFT's rule:
    ``re.match(rf"(.*\\.)?({key})$", name)``, first match in order), or ``None``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _resolve_dir(path_or_hub_id: str | os.PathLike, revision: str | None) -> Path:
    path = Path(os.fspath(path_or_hub_id)).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(path_or_hub_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(
            f"{name!r} is not an adapter directory (expected a directory holding {CONFIG_NAME} and "
            f"{' or '.join(WEIGHT_FILES)}) nor a Hugging Face hub id like 'org/adapter'"
        )
    import huggingface_hub

    return Path(huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=[CONFIG_NAME, *WEIGHT_FILES]))


def _read_weights(d: Path) -> dict[str, np.ndarray]:
    from sora_jax.hub import _read_safetensors, _read_torch_bin

    for name in WEIGHT_FILES:
        if (d / name).is_file():
            reader = _read_safetensors if name.endswith(".safetensors") else _read_torch_bin
            return {k: np.asarray(v) for k, v in reader(d / name).items()}
    raise FileNotFoundError(
        f"no adapter weights in {d}: expected {' or '.join(WEIGHT_FILES)} (write them with save_pretrained)"
    )


def _split_key(key: str) -> tuple[str, str | None, str]:
    """``(module name, leaf or None, remainder)``: ``bert...query.lora_A.weight`` -> ``("bert...query", "A", ...)``;
    a full parameter ``classifier.weight`` -> ``("classifier", None, "weight")``."""
    k = key.removeprefix(PREFIX)
    for suffix, leaf in _FACTORS.items():
        if k.endswith("." + suffix):
            return k[: -len(suffix) - 1], leaf, suffix
    module, _, leaf = k.rpartition(".")
    return module, None, leaf


# -- where a PEFT name lands in the params --------------------------------------------------------------
class _Names:
    """PEFT names -> our paths: ``module(name)`` a module path; ``param(key)`` a leaf path and whether the
    PyTorch array is transposed there."""

    def __init__(self, params: Any, model: Any | None, key_map: Callable[[str], str] | Mapping[str, str] | None,
                 config: AdapterConfig):
        self.leaves = {"/".join(path_str(kp)): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        self.modules = find_modules(params, config)
        self.table: dict[str, str] | None = None
        if model is not None and key_map is None:
            from sora_jax.export import _hf_name

            prefix = model.family.base_model_prefix + "."
            self.table = {}
            for path in self.leaves:
                hf = _hf_name(model, convert.hf_key(tuple(path.split("/"))))
                for variant in {hf, hf.removeprefix(prefix), prefix + hf}:
                    self.table.setdefault(variant, path)
        self.key_map = key_map

    def module(self, name: str) -> str:
        if self.table is not None:
            path = self.table.get(name + ".weight")
            return path.rsplit("/", 1)[0] if path is not None else name.replace(".", "/")
        if self.key_map is None:
            return name.replace(".", "/")
        if isinstance(self.key_map, Mapping):
            if name not in self.key_map:
                raise AdapterError(
                    f"PEFT module {name!r} is not in key_map; add an entry {{{name!r}: '<module path in params>'}} "
                    f"(module paths: {', '.join(sorted(self.modules)[:8])}, ...)"
                )
            return self.key_map[name]
        return self.key_map(name)

    def param(self, key: str) -> tuple[str, bool] | None:
        """Our leaf path for the full-parameter key ``classifier.weight`` and whether to transpose."""
        if self.table is not None:
            path = self.table.get(key)
            return None if path is None else (path, path.endswith("/kernel"))
        module, _, leaf = key.rpartition(".")
        base = self.module(module)
        cands = [(leaf, False)]
        if leaf == "weight":
            cands += [("kernel", True), ("scale", False), ("embedding", False)]
        for name, transpose in cands:
            if f"{base}/{name}" in self.leaves:
                return f"{base}/{name}", transpose and np.ndim(self.leaves[f"{base}/{name}"]) == 2
        return None


def _check_peft_config(cfg: Mapping[str, Any], source: Path) -> None:
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() not in ("LORA", "SORA"):
        raise AdapterError(
            f"{source}: peft_type {kind!r} is not an adapter sora_jax reads (LORA, DoRA through use_dora, and the "
            f"authors' SORA); convert the adapter to LoRA or merge it in PyTorch first"
        )
    for field, neutral in _UNSUPPORTED.items():
        value = cfg.get(field, neutral)
        if value not in (neutral, None, False, {}, []):
            raise AdapterError(
                f"{source}: {field}={value!r} is a PEFT option sora_jax does not read (the factors would mean "
                f"something else); retrain without it, or merge the adapter in PyTorch and load the merged model"
            )


def load_peft_adapter(
    path_or_hub_id: str | os.PathLike,
    model_or_params: Any,
    *,
    key_map: Callable[[str], str] | Mapping[str, str] | None = None,
    weight_leaves: Mapping[str, str] | None = None,
    bias_leaf: str = "bias",
    kernel_axes: Mapping[str, str] | None = None,
    lora_alpha: float | None = None,
    initial_s_p: float | None = None,
    revision: str | None = None,
    dtype: Any = jnp.float32,
) -> LoadedAdapter:
    """Read a PEFT LoRA/DoRA adapter directory (or the authors' SORA one) for ``model_or_params``.

    Args:
      path_or_hub_id: a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
        ``.bin``, read weights-only), or a hub id (downloaded with ``huggingface_hub``).
      model_or_params: a :class:`~sora_jax.hub.PretrainedModel` (PEFT names through the conversion table),
        or any parameter tree (dicts, NNX ``State``, Equinox module, PyTorch-named state dict).
      key_map: PEFT module name (``encoder.layers.0.q``) -> module path in ``params`` (``encoder/layers_0/q``):
        a function or a dict; default: dots become ``/``. For a ``PretrainedModel`` the table is used.
      weight_leaves, bias_leaf, kernel_axes: how ``params`` names and lays out its weights
        (:class:`~sora_jax.AdapterConfig`); defaults read Flax ``kernel`` and PyTorch/Equinox ``weight``.
      lora_alpha, initial_s_p: the LoRA scale's numerator and SORA's rotation scale where the directory has
        no ``adapter_config.json`` (a bare SORA state dict; ``initial_s_p`` defaults to 1.0); a config's
        values win otherwise.
      revision: a hub revision.
      dtype: the adapter leaves' dtype.

    Returns:
      ``LoadedAdapter(adapter, params)``: ``apply_adapter(params, adapter)`` is the adapted model; ``params``
      has the file's full parameters (``modules_to_save``) written in (same structure and dtypes).

    Raises:
      AdapterError: an unsupported PEFT option, a key with no module or parameter in ``params``, a rank
        that disagrees with the config, or shapes that do not fit (every problem listed at once).
      FileNotFoundError: no weights in the directory.
    """
    d = _resolve_dir(path_or_hub_id, revision)
    cfg_file = d / CONFIG_NAME
    peft_cfg: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    _check_peft_config(peft_cfg, cfg_file)
    state = _read_weights(d)
    model = None
    params = model_or_params
    if hasattr(model_or_params, "family") and hasattr(model_or_params, "params"):
        model, params = model_or_params, model_or_params.params
    layout_cfg = AdapterConfig(
        weight_leaves=weight_leaves or DEFAULT_WEIGHT_LEAVES, bias_leaf=bias_leaf, kernel_axes=kernel_axes or ()
    )
    names = _Names(params, model, key_map, layout_cfg)

    factors: dict[str, dict[str, np.ndarray]] = {}
    peft_names: dict[str, str] = {}
    full: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for key in sorted(state):
        module, leaf, _ = _split_key(key)
        if leaf is None:
            hit = names.param(key.removeprefix(PREFIX))
            if hit is None:
                problems.append(f"{key!r} {tuple(state[key].shape)}: no parameter for it in params")
                continue
            path, transpose = hit
            full[path] = state[key].T if transpose else state[key]
            continue
        path = names.module(module)
        if path not in names.modules:
            problems.append(f"{key!r}: PEFT module {module!r} maps to {path!r}, which is no module in params")
            continue
        peft_names[path] = module
        factors.setdefault(path, {})[leaf] = state[key]
    if problems:
        raise AdapterError(_fix_message(d, problems, model is not None))

    method = _method(factors, peft_cfg, d)
    if not peft_cfg and lora_alpha is None:
        raise AdapterError(
            f"{d} has no {CONFIG_NAME}, so the LoRA scale lora_alpha / r is unknown; pass "
            f"load_peft_adapter(..., lora_alpha=<the training run's lora_alpha>)"
        )
    tensor_ranks = [lv["A"].shape[0] for lv in factors.values() if "A" in lv]
    # without a config, the rank is the tensors' own (the most common one is r, the others a rank_pattern)
    r0 = int(peft_cfg["r"]) if "r" in peft_cfg else max(set(tensor_ranks), key=tensor_ranks.count)
    alpha0 = float(peft_cfg["lora_alpha"]) if "lora_alpha" in peft_cfg else float(lora_alpha)
    rank_pat, alpha_pat = peft_cfg.get("rank_pattern") or {}, peft_cfg.get("alpha_pattern") or {}
    layers: dict[str, dict[str, Any]] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    r_ps = set()
    for path, lv in sorted(factors.items()):
        name = peft_names[path]
        mod = resolve_layout(names.modules[path], layout_cfg)
        d_in, d_out = mod.layout.d_in, mod.layout.d_out
        if mod.layout.lead:
            problems.append(
                f"{name!r} -> {path!r}: a stacked kernel {mod.layout.shape}; PEFT names one 2-D weight per module, "
                f"load onto an unstacked params tree"
            )
            continue
        need = {"lora": {"A", "B"}, "dora": {"A", "B", "m"}, "sora": {"A", "B", "C", "D", "d"}}[method]
        if set(lv) != need:
            problems.append(f"{name!r}: has {sorted(lv)}, a {method} module needs {sorted(need)}")
            continue
        key = peft_pattern_key(rank_pat, name)
        r_cfg = int(rank_pat[key]) if key is not None else r0
        r = lv["A"].shape[0]
        if r != r_cfg and "r" in peft_cfg:
            problems.append(
                f"{name!r}: lora_A.weight has shape {lv['A'].shape} (rank {r}) but {CONFIG_NAME} gives r={r_cfg}; the "
                f"config does not belong to these weights"
            )
        key = peft_pattern_key(alpha_pat, name)
        ranks[path], alphas[path] = r, float(alpha_pat[key]) if key is not None else alpha0
        want = {"A": (r, d_in), "B": (d_out, r), "m": (d_out,), "d": (d_out, 1)}
        if method == "sora":
            r_ps.add(lv["C"].shape[-1])
            want.update(C=(d_out, lv["C"].shape[-1]), D=(d_out, lv["C"].shape[-1]))
        for leaf, arr in lv.items():
            w = want[leaf] if not (leaf == "d" and arr.ndim == 1) else (d_out,)
            if tuple(arr.shape) != w:
                problems.append(
                    f"{name!r}.{leaf}: shape {tuple(arr.shape)}, but module {path!r} ({mod.weight_name} "
                    f"{mod.layout.shape}, d_in={d_in}, d_out={d_out}) needs {w}; the adapter was trained for "
                    f"another model"
                )
        layers[path] = {
            "A": lv["A"].T,
            "B": lv["B"].T,
            **({"m": lv["m"]} if "m" in lv else {}),
            **({"d": lv["d"].reshape(-1), "C": lv["C"], "D": lv["D"]} if method == "sora" else {}),
        }
    if "r_p" in peft_cfg and r_ps and r_ps != {int(peft_cfg["r_p"])}:
        problems.append(f"lora_C has rotation rank {sorted(r_ps)} but {CONFIG_NAME} gives r_p={peft_cfg['r_p']}")
    if len(r_ps) > 1:
        problems.append(f"lora_C has rotation ranks {sorted(r_ps)} across modules; sora_jax uses one rotation_rank")
    if problems:
        raise AdapterError(_fix_message(d, problems, model is not None))

    saved = sorted({p.rsplit("/", 1)[0] for p in full})
    config = AdapterConfig(
        method=method,
        r=r0,
        lora_alpha=alpha0,
        use_rslora=bool(peft_cfg.get("use_rslora", False)),
        rotation_rank=r_ps.pop() if r_ps else 1,
        initial_s_p=float(peft_cfg.get("initial_s_p", 1.0 if initial_s_p is None else initial_s_p)),
        target_modules=tuple(sorted(layers)),
        rank_pattern={f"^{re.escape(p)}$": r for p, r in ranks.items() if r != r0},
        alpha_pattern={f"^{re.escape(p)}$": a for p, a in alphas.items() if a != alpha0},
        lora_dropout=float(peft_cfg.get("lora_dropout", 0.0)),
        modules_to_save=tuple(saved) or None,
        weight_leaves=layout_cfg.weight_leaves,
        bias_leaf=bias_leaf,
        kernel_axes=layout_cfg.kernel_axes,
    )
    adapter = Adapter(config, {p: {k: jnp.asarray(v, dtype) for k, v in lv.items()} for p, lv in layers.items()})
    new_params = _write_params(params, full)
    check_compatible(new_params, adapter)
    return LoadedAdapter(adapter, new_params)


def _method(factors: Mapping[str, Mapping[str, Any]], cfg: Mapping[str, Any], d: Path) -> str:
    kinds = {frozenset(lv) for lv in factors.values()}
    has = set().union(*kinds) if kinds else set()
    if not factors:
        raise AdapterError(f"{d}: no lora_A/lora_B keys in the adapter weights; is it a LoRA adapter?")
    if has & {"C", "D", "d"}:
        return "sora"
    if "m" in has:
        if cfg and not cfg.get("use_dora", False):
            raise AdapterError(f"{d}: DoRA magnitude vectors present but use_dora is false in {CONFIG_NAME}")
        return "dora"
    if cfg.get("use_dora", False):
        raise AdapterError(f"{d}: use_dora is true in {CONFIG_NAME} but no lora_magnitude_vector keys are stored")
    return "lora"


def _fix_message(d: Path, problems: list[str], is_model: bool) -> str:
    fix = (
        "is the adapter for this model (same architecture and task)?"
        if is_model
        else "pass key_map={PEFT module name: module path in params} (or a function) so that every PEFT name "
        "lands on a module"
    )
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{d} does not fit these params ({len(problems)} problem(s)):\n{lines}\n{fix}"


def _write_params(params: Any, full: Mapping[str, np.ndarray]) -> Any:
    """``params`` with the leaves at ``full``'s paths replaced (shape checked, dtype kept)."""
    if not full:
        return params
    bad = []

    def swap(keypath, leaf):
        p = "/".join(path_str(keypath))
        if p not in full:
            return leaf
        value = full[p]
        if tuple(value.shape) != tuple(np.shape(leaf)):
            bad.append(f"{p}: the adapter file has shape {tuple(value.shape)}, params {tuple(np.shape(leaf))}")
            return leaf
        return jnp.asarray(value, dtype=leaf.dtype)

    out = jax.tree_util.tree_map_with_path(swap, params)
    if bad:
        raise AdapterError(
            "the adapter's full parameters (modules_to_save) do not fit: " + "; ".join(bad)
            + "; was the head trained with another num_labels? load the model with that num_labels"
        )
    return out
