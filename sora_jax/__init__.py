"""sora-jax: weight-conditioning PEFT (LoRA, DoRA, Pre-Diag, SORA, Pre-Ortho, Post-Ortho, Post-Diag) in JAX.

The adapter core is pure functions over parameter pytrees::

    config = sora_jax.AdapterConfig(method="sora", r=16, lora_alpha=16, target_modules=["query", "value"])
    adapter = sora_jax.init_adapter(jax.random.key(0), params, config)
    effective = sora_jax.apply_adapter(params, adapter)   # same tree as params, W -> W'
    merged = sora_jax.merge(params, adapter)               # float32 merge, cast back

Model loading, export and training live in submodules and are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from sora_jax.adapter import (
    Adapter,
    apply_adapter,
    effective_weights,
    find_modules,
    init_adapter,
    merge,
    trainable_parameters,
)
from sora_jax.config import ROTATIONS, AdapterConfig, AdapterError
from sora_jax.dense import adapted_dense
from sora_jax.io import load_adapter, save_adapter
from sora_jax.methods import METHODS
from sora_jax.rotation import rotate, rotation_matrix
from sora_jax.spectrum import spectrum

__version__ = "0.1.0"

# Heavier entry points (transformers, torch-free loading, training), imported lazily.
_LAZY = {
    "load_pretrained": "sora_jax.hub",
    "PretrainedModel": "sora_jax.hub",
    "CheckpointMismatchError": "sora_jax.hub",
    "export_merged": "sora_jax.export",
    "export_peft_adapter": "sora_jax.export",
    "load_peft_adapter": "sora_jax.peft_import",
    "LoadedAdapter": "sora_jax.peft_import",
    "linen_activation_path": "sora_jax.intercept",
    "nnx_activation_path": "sora_jax.intercept",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sora_jax' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "ROTATIONS",
    "Adapter",
    "AdapterConfig",
    "AdapterError",
    "adapted_dense",
    "apply_adapter",
    "effective_weights",
    "find_modules",
    "init_adapter",
    "load_adapter",
    "merge",
    "rotate",
    "rotation_matrix",
    "save_adapter",
    "spectrum",
    "trainable_parameters",
    *_LAZY,
]
