"""Export to Hugging Face formats: a merged ``transformers`` directory, or a PEFT LoRA/DoRA adapter.

``export_merged`` writes ``config.json`` (with the task's ``architectures``), ``model.safetensors``
(metadata ``{"format": "pt"}``, PyTorch names and layouts) and the tokenizer files, with the adapter
merged into the weights (docs/spec.md section 3). ``export_peft_adapter`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` in PEFT's layout: ``base_model.model.<module>.lora_A.weight (r, d_in)``,
``.lora_B.weight (d_out, r)``, DoRA's ``.lora_magnitude_vector (d_out,)`` and the
``modules_to_save`` weights as ``base_model.model.<module>.<param>``. Every write is atomic
(:func:`sora_jax.io.atomic_directory`): a failure leaves no half-written directory.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from sora_jax import convert
from sora_jax.adapter import Adapter, find_modules, merge, saved_leaves
from sora_jax.config import AdapterError
from sora_jax.hub import PretrainedModel
from sora_jax.io import atomic_directory

__all__ = ["export_merged", "export_peft_adapter", "hf_architecture", "hf_state_dict"]

PEFT_METHODS = {"lora": False, "dora": True}  # method -> use_dora
_PEFT_TASK_TYPES = {
    "sequence_classification": "SEQ_CLS",
    "causal_lm": "CAUSAL_LM",
    "base": "FEATURE_EXTRACTION",
}


def hf_architecture(model_type: str, task: str) -> str:
    """The ``transformers`` class for ``model_type`` and our ``task`` (``BertForSequenceClassification``)."""
    from transformers.models.auto import modeling_auto as auto

    tables = {
        "base": auto.MODEL_MAPPING_NAMES,
        "sequence_classification": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "causal_lm": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    }
    if task not in tables or model_type not in tables[task]:
        raise ValueError(f"transformers has no class for model_type {model_type!r} and task {task!r}")
    return tables[task][model_type]


def _hf_name(model: PretrainedModel, name: str) -> str:
    """A full Hugging Face name as the task's class names it: a base model (``BertModel``) has no
    ``base_model_prefix``."""
    prefix = model.family.base_model_prefix + "."
    if model.task == "base" and name.startswith(prefix):
        return name[len(prefix) :]
    return name


def hf_state_dict(model: PretrainedModel, params: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
    """``(state dict in PyTorch names/layouts, tie_word_embeddings)`` for ``params``.

    A tied parameter (``ModelFamily.tied``) that still equals its source is left out when the config
    ties embeddings; if it differs, it is written and ``tie_word_embeddings`` becomes ``False``.
    """
    flat = dict(convert.iter_paths(model.per_layer(params)))
    tie = bool(getattr(model.config, "tie_word_embeddings", False))
    skip: set[tuple[str, ...]] = set()
    for target, source in model.family.tied:
        t, s = tuple(target.split("/")), tuple(source.split("/"))
        if t in flat and s in flat and tie:
            tv, sv = np.asarray(flat[t]), np.asarray(flat[s])
            sv = sv if sv.shape == tv.shape else np.swapaxes(sv, -1, -2)
            if np.array_equal(tv, sv):
                skip.add(t)
            else:
                tie = False
    state = {
        _hf_name(model, convert.hf_key(p)): np.ascontiguousarray(convert.hf_layout(p, np.asarray(v)))
        for p, v in flat.items()
        if p not in skip
    }
    return state, tie


def export_merged(
    model: PretrainedModel, params: Mapping[str, Any], adapter: Adapter | None, out_dir: str | os.PathLike
) -> Path:
    """Write a ``transformers`` directory of ``params`` with ``adapter`` merged in (``None``: as is).

    ``AutoModelFor...from_pretrained(out_dir)`` loads it with no missing or unexpected weights and
    reproduces the unmerged JAX outputs (to float32 rounding). Params keep their dtype. Returns the
    directory.
    """
    merged = params if adapter is None else merge(params, adapter)
    state, tie = hf_state_dict(model, merged)
    config = copy.deepcopy(model.config)
    config.architectures = [hf_architecture(config.model_type, model.task)]
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = tie

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))

    return atomic_directory(out_dir, write)


def _module_name(model: PretrainedModel, path: str) -> str:
    """Our module path (``bert/encoder/layer_0/attention/self/query``) -> the HF module name."""
    return _hf_name(model, convert.hf_key((*path.split("/"), "kernel")).removesuffix(".weight"))


def _saved_modules(params: Mapping[str, Any], adapter: Adapter) -> list[str]:
    """The top-most module paths selected by ``modules_to_save`` (``["classifier"]``)."""
    tops = set()
    for leaf_path, _ in saved_leaves(params, adapter.config):
        parts = leaf_path.split("/")
        for i in range(1, len(parts)):
            if adapter.config.saves("/".join(parts[:i])):
                tops.add("/".join(parts[:i]))
                break
    return sorted(tops)


def export_peft_adapter(
    model: PretrainedModel,
    adapter: Adapter,
    out_dir: str | os.PathLike,
    *,
    params: Mapping[str, Any] | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a LoRA or DoRA ``adapter`` in PEFT's layout (``peft.PeftModel.from_pretrained`` loads it).

    Args:
      model: the loaded base model (names, task, config).
      adapter: a ``lora`` or ``dora`` adapter for ``model``'s params.
      out_dir: the directory to write (replaced atomically).
      params: where the ``modules_to_save`` weights (the trained head) come from; default
        ``model.params``. For a classification task the head is always saved, as PEFT's
        ``SEQ_CLS`` models treat it as trained.
      base_model_name_or_path: recorded in ``adapter_config.json``; default the directory the model
        was loaded from.

    Raises:
      AdapterError: a method without a PEFT layout (use :func:`sora_jax.save_adapter`), or stacked
        (scanned) kernels, which PEFT's per-module layout cannot name.
    """
    cfg = adapter.config
    if cfg.method not in PEFT_METHODS:
        raise AdapterError(
            f"method {cfg.method!r} has no PEFT layout (PEFT stores only LoRA and DoRA); save it with "
            f"sora_jax.save_adapter(adapter, dir) (read back with sora_jax.load_adapter), or write a merged "
            f"transformers model with sora_jax.export_merged"
        )
    params = model.params if params is None else params
    modules = find_modules(params)
    tensors: dict[str, np.ndarray] = {}
    names: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for path, leaves in sorted(adapter.layers.items()):
        if path not in modules:
            raise AdapterError(f"adapter module {path!r} is not in the model's params; was it made for another model?")
        if np.ndim(modules[path].kernel) != 2:
            raise AdapterError(
                f"module {path!r} has a stacked kernel {tuple(np.shape(modules[path].kernel))}; PEFT's "
                f"layout names one 2-D weight per module; save it with sora_jax.save_adapter"
            )
        name = _module_name(model, path)
        names.append(name)
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(np.asarray(leaves["A"]).T)
        tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(np.asarray(leaves["B"]).T)
        if cfg.method == "dora":
            tensors[f"{key}.lora_magnitude_vector"] = np.asarray(leaves["m"])
        if cfg.rank_for(path) != cfg.r:
            rank_pattern[name] = cfg.rank_for(path)
        if cfg.alpha_for(path) != cfg.lora_alpha:
            alpha_pattern[name] = cfg.alpha_for(path)

    saved = _saved_modules(params, adapter)
    heads = [h for h in model.family.head_prefixes if h in params]
    adapted_heads = [h for h in heads if any(p == h or p.startswith(h + "/") for p in adapter.layers)]
    if model.task == "sequence_classification":
        saved = sorted(set(saved) | {h for h in heads if h not in adapted_heads})
    for top in saved:
        for p, v in convert.iter_paths(_subtree(params, top), tuple(top.split("/"))):
            tensors[f"base_model.model.{_hf_name(model, convert.hf_key(p))}"] = np.ascontiguousarray(
                convert.hf_layout(p, np.asarray(v))
            )

    peft_config = {
        "peft_type": "LORA",
        "task_type": _PEFT_TASK_TYPES.get(model.task),
        "base_model_name_or_path": base_model_name_or_path
        or (str(model.path) if model.path is not None else getattr(model.config, "_name_or_path", None)),
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "use_rslora": cfg.use_rslora,
        "use_dora": PEFT_METHODS[cfg.method],
        "lora_dropout": cfg.lora_dropout,
        "target_modules": names,
        "modules_to_save": [_module_name(model, s) for s in saved] or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2, sort_keys=True))

    return atomic_directory(out_dir, write)


def _subtree(params: Mapping[str, Any], path: str) -> Any:
    node: Any = params
    for k in path.split("/"):
        node = node[k]
    return node
