"""Gemma, Gemma 2 and Gemma 3 (text) decoders in Flax, numerically equal to ``transformers``' models.

One module serves the three ``model_type`` values ``gemma``, ``gemma2`` and ``gemma3_text``; they share
LLaMA's skeleton (rotary embeddings, grouped-query attention, a gated MLP, the key/value cache:
:mod:`sora_jax.models.decoder`), whose modules this file subclasses, and differ from it by:

- RMSNorm with a ``(1 + w)`` scale, normalised and scaled in float32 (``w`` initialised to 0);
- input embeddings scaled by ``sqrt(hidden_size)`` (the scale rounded to the parameters' dtype);
- a GeGLU MLP (``hidden_act`` / ``hidden_activation``, ``gelu_pytorch_tanh``) and an explicit ``head_dim``;
- Gemma 2 / 3: attention scale ``query_pre_attn_scalar ** -0.5``, norms after attention and around the
  MLP (``post_attention_layernorm`` normalises the attention output, ``pre_feedforward_layernorm`` /
  ``post_feedforward_layernorm`` the MLP's input and output), sliding-window layers by ``layer_types``
  (a query sees the last ``sliding_window`` positions), and ``final_logit_softcapping``
  (``cap * tanh(logits / cap)``);
- Gemma 2: ``attn_logit_softcapping`` on the attention logits (Gemma 3 configs carry the field, but
  ``transformers`` does not apply it there, and neither do we);
- Gemma 3: RMSNorm of queries and keys per head (``q_norm``, ``k_norm``) before the rotary embedding, and
  two rotary bases: ``rope_parameters["full_attention"]`` for global layers and
  ``["sliding_attention"]`` for the local ones.

Parameter paths mirror the Hugging Face names (``model/layers_0/self_attn/q_norm/scale``,
``model/layers_0/pre_feedforward_layernorm/scale``, ...), so ``sora_jax.convert.hf_key`` maps every leaf.
Every dense layer is a :class:`~sora_jax.models.common.Linear` running the top module's ``dense_fn``; the
call interface (masks, positions, key/value cache) is :class:`sora_jax.models.llama.LlamaForTask`'s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.models.common import ModelFamily
from sora_jax.models.decoder import (
    FULL,
    SLIDING,
    TASKS,
    DecoderAttention,
    DecoderForTask,
    DecoderLayer,
    DecoderStack,
    GatedMLP,
    build_decoder,
    check_config,
    hf_common,
    hf_dict,
    rms_normalise,
)
from sora_jax.models.llama import LlamaConfig, rope_inv_freq
from sora_jax.ops import default_dense

Array = jax.Array

VARIANTS = ("gemma", "gemma2", "gemma3_text")
LAYER_TYPES = (FULL, SLIDING)
ROPE_TYPES = ("default", "linear")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """The architecture hyper-parameters of a Gemma-family decoder (``variant`` is the ``model_type``).

    ``rope_theta``/``rope_type``/``rope_factor`` are the global layers' rotary parameters,
    ``local_rope_theta`` the sliding layers' (Gemma 3; ``None``: the global ones). ``layer_types`` has
    one entry per layer (``"full_attention"`` or ``"sliding_attention"``).
    """

    variant: str = "gemma"
    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    hidden_act: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    local_rope_theta: float | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    query_pre_attn_scalar: float = 256.0
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    num_labels: int = 2
    mlp_bias: bool = False  # Gemma has none; the gated MLP reads it
    # execution, not architecture: the blocks under nn.scan (sora_jax.models.common.scan_blocks)
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"Unsupported Gemma variant {self.variant!r}; supported: {VARIANTS}.")
        check_config(self)
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"Unsupported rope type {self.rope_type!r} for Gemma; supported: {ROPE_TYPES}. "
                "Set rope_parameters to one of these."
            )
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise ValueError(
                f"layer_types must name one of {LAYER_TYPES} for each of the {self.num_hidden_layers} layers; "
                f"got {self.layer_types}."
            )
        if "sliding_attention" in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
            raise ValueError(f"sliding layers need a positive sliding_window, got {self.sliding_window}.")

    @property
    def sandwich_norms(self) -> bool:
        """Norms after attention and around the MLP (Gemma 2 and 3)."""
        return self.variant != "gemma"

    @property
    def qk_norm(self) -> bool:
        """RMSNorm of queries and keys per head (Gemma 3)."""
        return self.variant == "gemma3_text"

    def rope(self, layer_type: str) -> LlamaConfig:
        """The rotary parameters of ``layer_type``'s layers, in the form :func:`rope_inv_freq` reads."""
        if layer_type == "sliding_attention" and self.local_rope_theta is not None:
            return LlamaConfig(head_dim=self.head_dim, rope_theta=self.local_rope_theta)
        return LlamaConfig(
            head_dim=self.head_dim, rope_theta=self.rope_theta, rope_type=self.rope_type, rope_factor=self.rope_factor
        )

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any) -> GemmaConfig:
        """From a ``transformers`` ``GemmaConfig`` / ``Gemma2Config`` / ``Gemma3TextConfig`` or its
        ``config.json`` dict."""
        d = hf_dict(hf_config)
        variant = d.get("model_type", "gemma")
        if variant == "gemma3":
            raise ValueError(
                "model_type 'gemma3' is the multimodal Gemma 3; load its text model (model_type 'gemma3_text', "
                "e.g. a GGUF file or the config's text_config)."
            )
        if d.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True (an embedding model) is not supported; use a causal LM.")
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        local_theta = None
        if "full_attention" in rope or "sliding_attention" in rope:  # per layer type (Gemma 3)
            local = dict(rope.get("sliding_attention") or {})
            rope = dict(rope.get("full_attention") or {})
            local_theta = float(local.get("rope_theta") or d.get("rope_local_base_freq") or 10000.0)
            if local.get("rope_type", "default") != "default":
                raise ValueError(f"Unsupported rope type {local['rope_type']!r} for sliding layers; only 'default'.")
        layer_types = d.get("layer_types")
        if not layer_types:
            layer_types = [FULL] * d["num_hidden_layers"]
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if variant == "gemma" and act == "gelu":  # transformers' GemmaConfig maps the legacy name the same way
            act = "gelu_pytorch_tanh"
        return cls(
            **hf_common(d),
            variant=variant,
            head_dim=head_dim,
            hidden_act=act,
            rope_theta=float(rope.get("rope_theta") or d.get("rope_theta") or 10000.0),
            rope_type=rope.get("rope_type", rope.get("type", "default")),
            rope_factor=float(rope.get("factor", 1.0)),
            local_rope_theta=local_theta,
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or head_dim)
            if variant != "gemma"
            else float(head_dim),
            sliding_window=d.get("sliding_window"),
            layer_types=tuple(layer_types),
            attn_logit_softcapping=d.get("attn_logit_softcapping") if variant == "gemma2" else None,
            final_logit_softcapping=d.get("final_logit_softcapping") if variant != "gemma" else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        )


def softcap(x: Array, cap: float | None) -> Array:
    """``cap * tanh(x / cap)`` (``x`` itself when ``cap`` is None)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


@dataclasses.dataclass(frozen=True)
class GemmaRMSNormFn:
    """``(x / sqrt(mean(x^2) + eps)) * (1 + scale)`` in float32, cast to ``dtype`` (as Hugging Face): a
    hashable function of ``(x, scale)``, which a dense layer can apply itself (``input_norm``)."""

    eps: float
    dtype: Any

    def __call__(self, x: Array, scale: Array) -> Array:
        return (rms_normalise(x, self.eps) * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)


class GemmaRMSNorm(nn.Module):
    """:class:`GemmaRMSNormFn` with its parameter. Params: ``scale (d,)``, initialised to 0.
    ``as_input=True``: ``(fn, scale)``, as :class:`sora_jax.models.llama.RMSNorm`."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, as_input: bool = False) -> Any:
        scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        fn = GemmaRMSNormFn(self.eps, self.dtype)
        return (fn, scale) if as_input else fn(x, scale)


class GemmaAttention(DecoderAttention):
    """Grouped-query self-attention with rotary embeddings (:class:`sora_jax.models.decoder.DecoderAttention`),
    scale ``query_pre_attn_scalar ** -0.5``, QK-norm in Gemma 3, logit soft-capping in Gemma 2. Params:
    ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` as LLaMA; ``q_norm``/``k_norm (head_dim,)`` in Gemma 3."""

    norm_cls = GemmaRMSNorm

    def normalize_qk(self, q: Array, k: Array) -> tuple[Array, Array]:
        if not self.config.qk_norm:
            return q, k
        return self.norm_layer("q_norm")(q), self.norm_layer("k_norm")(k)

    def scale(self) -> float:
        return self.config.query_pre_attn_scalar**-0.5

    def logit_softcap(self) -> float | None:
        return self.config.attn_logit_softcapping

    def rotary_qk_norm(self, q: Array) -> tuple[Any, Array, Array] | None:
        if not self.config.qk_norm:
            return None
        heads = q.reshape(*q.shape[:-1], -1, self.config.head_dim)  # the norms' parameter shape, (head_dim,)
        norm, q_scale = self.norm_layer("q_norm")(heads, as_input=True)
        _, k_scale = self.norm_layer("k_norm")(heads, as_input=True)
        return norm, q_scale, k_scale


class GemmaDecoderLayer(DecoderLayer):
    """Gemma: ``x + attn(norm(x))``, ``x + mlp(norm(x))``. Gemma 2/3: ``x + norm(attn(norm(x)))``,
    ``x + norm(mlp(norm(x)))``."""

    norm_cls = GemmaRMSNorm
    attention_cls = GemmaAttention
    mlp_cls = GatedMLP

    def sandwich_norms(self) -> bool:
        return self.config.sandwich_norms


class GemmaModel(DecoderStack):
    """The decoder stack: input embeddings scaled by ``sqrt(hidden_size)``, layers by ``layer_types``
    (sliding ones see the last ``sliding_window`` positions, with their own rotary base in Gemma 3).
    Params: ``embed_tokens/embedding (vocab, hidden)``, ``layers_{i}/...``, ``norm/scale (hidden,)``."""

    norm_cls = GemmaRMSNorm
    layer_cls = GemmaDecoderLayer

    def layer_types(self) -> tuple[str, ...]:
        return self.config.layer_types

    def inv_freq(self, layer_type: str) -> np.ndarray:
        return rope_inv_freq(self.config.rope(layer_type))

    def window(self, layer_type: str) -> int | None:
        return self.config.sliding_window if layer_type == SLIDING else None

    def embed_scale(self) -> Array:
        # the scale rounded to the parameters' dtype, as Hugging Face
        return jnp.asarray(math.sqrt(self.config.hidden_size), self.param_dtype).astype(self.dtype)


class GemmaForTask(DecoderForTask):
    """A Gemma-family model for ``task`` in :data:`TASKS`, as :class:`sora_jax.models.llama.LlamaForTask`
    (``lm_head/kernel`` only without ``tie_word_embeddings``; causal-LM logits soft-capped by
    ``final_logit_softcapping``)."""

    model_cls = GemmaModel
    family = "Gemma"

    def lm_logits(self, logits: Array) -> Array:
        return softcap(logits.astype(jnp.float32), self.config.final_logit_softcapping)


def build(
    hf_config: Mapping[str, Any] | Any,
    task: str = "causal_lm",
    dtype: Any = jnp.float32,
    dense_fn: Callable[..., Array] | None = default_dense,
    param_dtype: Any = jnp.float32,
    *,
    scan_layers: bool = False,
    remat: str = "none",
) -> GemmaForTask:
    """A :class:`GemmaForTask` from a Hugging Face config (or a :class:`GemmaConfig`); ``ModelFamily.build``;
    ``scan_layers``/``remat``: see :func:`sora_jax.models.common.scan_blocks`."""
    return build_decoder(GemmaForTask, GemmaConfig, hf_config, task, dtype, dense_fn, param_dtype, scan_layers, remat)


FAMILY = ModelFamily(
    model_types=VARIANTS,
    build=build,
    tasks=TASKS,
    base_model_prefix="model",
    layer_stack="layers",
    head_prefixes=("lm_head", "score"),
    ignore_hf_keys=(r"(^|\.)rotary_emb\.", r"(^|\.)embed_tokens\.embed_scale$"),
    tied=(("lm_head/kernel", "model/embed_tokens/embedding"),),
)
