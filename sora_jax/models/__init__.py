"""Model families by Hugging Face ``model_type``; each family's module is imported on first use."""

from __future__ import annotations

import importlib
import importlib.util

from sora_jax.models.common import ModelFamily

# model_type -> the sora_jax.models submodule that serves it (exposing FAMILY or FAMILIES)
_MODULES: dict[str, str] = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "deberta-v2": "deberta_v2",
    "llama": "llama",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_MODULES)


def get_family(model_type: str) -> ModelFamily:
    """The :class:`ModelFamily` serving ``model_type`` (a ``transformers`` ``config.model_type``).

    Raises ``ValueError`` for an unknown ``model_type`` or when its family module cannot be imported.
    """
    module_name = _MODULES.get(model_type)
    if module_name is None:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        module = importlib.import_module(f"sora_jax.models.{module_name}")
    except ModuleNotFoundError as e:
        if e.name != f"sora_jax.models.{module_name}":
            raise
        available = [t for t, m in _MODULES.items() if importlib.util.find_spec(f"sora_jax.models.{m}")]
        raise ValueError(
            f"unsupported model_type {model_type!r}: its module sora_jax.models.{module_name} is not "
            f"available; supported: {', '.join(available)}"
        ) from e
    families = getattr(module, "FAMILIES", None) or (module.FAMILY,)
    for family in families:
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"unsupported model_type {model_type!r}: sora_jax.models.{module_name} does not serve it; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
