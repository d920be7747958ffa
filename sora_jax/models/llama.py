"""LLaMA (Llama 2 / Llama 3 style decoder) in Flax, numerically equal to ``transformers``' ``LlamaModel``.

Modules: :class:`LlamaModel` (the decoder stack) and :class:`LlamaForTask` (``base``, ``causal_lm``,
``sequence_classification`` with the last non-padding token pooled through ``score``). The
architecture: RMSNorm (computed in float32), rotary position embeddings (``default``, ``linear`` and
``llama3`` frequency scaling), grouped-query attention (``num_key_value_heads``), a SwiGLU MLP
(``down_proj(act(gate_proj(x)) * up_proj(x))``), optional ``attention_bias`` / ``mlp_bias``, a causal
mask combined with a ``(batch, seq)`` padding ``attention_mask`` (left or right padding), and tied or
untied output embeddings. For decoding, a key/value cache (:func:`init_cache`) is passed in and the
updated one returned (``cache``, ``cache_index``), a pure function as everything else. The skeleton
(attention, MLP, block, stack, heads, cache) is :mod:`sora_jax.models.decoder`, shared with Gemma; this
file holds what is LLaMA's own: the config, the rotary frequency scalings and the RMSNorm.

Parameter paths mirror the Hugging Face names (see ``sora_jax.models.common``), e.g.
``model/layers_0/self_attn/q_proj/kernel``, ``model/embed_tokens/embedding``, ``model/norm/scale``,
``lm_head/kernel``, so ``sora_jax.convert.hf_key(path)`` is the Hugging Face key of every leaf. Every
dense layer is a :class:`~sora_jax.models.common.Linear` running the top module's ``dense_fn``.
With ``tie_word_embeddings`` the causal LM has no ``lm_head`` parameter: logits are
``h @ embedding.T`` with the input embedding.
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

from sora_jax.models.attention import rotate_half  # noqa: F401 (re-exported)
from sora_jax.models.common import ModelFamily
from sora_jax.models.decoder import (  # noqa: F401 (the shared pieces, re-exported under their old names)
    TASKS,
    DecoderAttention,
    DecoderForTask,
    DecoderLayer,
    DecoderStack,
    GatedMLP,
    LayerCache,
    apply_rope,
    attention_mask_4d,
    build_decoder,
    check_cache,
    check_config,
    decoder_mask,
    hf_common,
    hf_dict,
    init_cache,
    last_non_pad_index,
    rms_normalise,
    rope_cos_sin,
    update_cache,
)
from sora_jax.ops import default_dense

Array = jax.Array

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture hyper-parameters (a hashable subset of Hugging Face's ``LlamaConfig``).

    ``rope_type`` is ``"default"``, ``"linear"`` (``rope_factor`` divides every frequency) or
    ``"llama3"`` (``rope_factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``, as Llama 3.1).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    num_labels: int = 2
    # execution, not architecture (not in a transformers config): the decoder's blocks under nn.scan, with
    # this rematerialisation policy (sora_jax.models.common.scan_blocks)
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self) -> None:
        check_config(self)
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"Unsupported rope type {self.rope_type!r}; supported: {ROPE_TYPES}. "
                "Set rope_parameters / rope_scaling to one of these."
            )
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}."
            )

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any) -> LlamaConfig:
        """From a ``transformers.LlamaConfig`` or its ``config.json`` dict (old ``rope_scaling`` too)."""
        d = hf_dict(hf_config)
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim")
        if head_dim is None:
            if d["hidden_size"] % heads:
                raise ValueError(
                    f"hidden_size ({d['hidden_size']}) is not divisible by num_attention_heads ({heads}); "
                    "set head_dim in the config."
                )
            head_dim = d["hidden_size"] // heads
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("LLaMA applies rotary embeddings to the whole head; partial_rotary_factor must be 1.")
        return cls(
            **hf_common(d),
            head_dim=head_dim,
            hidden_act=d.get("hidden_act", "silu"),
            rope_theta=float(rope.get("rope_theta") or d.get("rope_theta") or 10000.0),
            rope_type=rope.get("rope_type", rope.get("type", "default")),
            rope_factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings")
                or d.get("original_max_position_embeddings")
                or d.get("max_position_embeddings", 2048)
            ),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Rotary inverse frequencies ``(head_dim // 2,)`` float32, as ``transformers.modeling_rope_utils``.

    ``default``: ``theta ** (-2i / head_dim)``; ``linear``: divided by ``rope_factor``; ``llama3``: low
    frequencies (wavelength > ``original_max / low_freq_factor``) divided by ``rope_factor``, high ones
    (wavelength < ``original_max / high_freq_factor``) kept, the band between interpolated smoothly.
    Computed in float32 like the reference, so the two agree to the last bits.
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)
    if config.rope_type == "linear":
        return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
    if config.rope_type == "default":
        return inv_freq.astype(np.float32)
    factor = np.float32(config.rope_factor)
    low, high = config.low_freq_factor, config.high_freq_factor
    old_len = config.original_max_position_embeddings
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RMSNormFn:
    """``scale * (x / sqrt(mean(x^2) + eps))``, normalised in float32 then cast to ``dtype`` (as Hugging
    Face): a hashable function of ``(x, scale)``, which a dense layer can apply itself (``input_norm``)."""

    eps: float
    dtype: Any

    def __call__(self, x: Array, scale: Array) -> Array:
        return scale.astype(self.dtype) * rms_normalise(x, self.eps).astype(self.dtype)


class RMSNorm(nn.Module):
    """:class:`RMSNormFn` with its parameter. Params: ``scale (d,)``. Output dtype: ``dtype``.
    ``as_input=True`` returns ``(fn, scale)`` instead of ``fn(x, scale)``, for the next dense layers to
    apply (the ``input_norm`` of :mod:`sora_jax.models.common`)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, as_input: bool = False) -> Any:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        fn = RMSNormFn(self.eps, self.dtype)
        return (fn, scale) if as_input else fn(x, scale)


class LlamaAttention(DecoderAttention):
    """Grouped-query self-attention with rotary embeddings, scale ``head_dim ** -0.5``
    (:class:`sora_jax.models.decoder.DecoderAttention`).

    Params: ``q_proj (hidden, heads*head_dim)``, ``k_proj``/``v_proj (hidden, kv_heads*head_dim)``,
    ``o_proj (heads*head_dim, hidden)`` (biases with ``attention_bias``).
    """


class LlamaMLP(GatedMLP):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``.

    Params: ``gate_proj``/``up_proj (hidden, intermediate)``, ``down_proj (intermediate, hidden)``.
    """


class LlamaDecoderLayer(DecoderLayer):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    norm_cls = RMSNorm
    attention_cls = LlamaAttention
    mlp_cls = LlamaMLP


class LlamaModel(DecoderStack):
    """The decoder stack (``transformers.LlamaModel``); every layer attends to the whole causal past.

    Params: ``embed_tokens/embedding (vocab, hidden)``, ``layers_{i}/...``, ``norm/scale (hidden,)``.
    """

    norm_cls = RMSNorm
    layer_cls = LlamaDecoderLayer

    def inv_freq(self, layer_type: str) -> np.ndarray:
        return rope_inv_freq(self.config)


class LlamaForTask(DecoderForTask):
    """A LLaMA model for ``task`` in :data:`TASKS`; the decoder is the submodule ``model``
    (``transformers.LlamaModel``, ``LlamaForCausalLM``, ``LlamaForSequenceClassification``), see
    :class:`sora_jax.models.decoder.DecoderForTask`."""

    model_cls = LlamaModel
    family = "LLaMA"


def build(
    hf_config: Mapping[str, Any] | Any,
    task: str = "causal_lm",
    dtype: Any = jnp.float32,
    dense_fn: Callable[..., Array] | None = default_dense,
    param_dtype: Any = jnp.float32,
    *,
    scan_layers: bool = False,
    remat: str = "none",
) -> LlamaForTask:
    """A :class:`LlamaForTask` from a Hugging Face config (``transformers.LlamaConfig``, its
    ``config.json`` dict, or a :class:`LlamaConfig`); ``ModelFamily.build``.

    ``dtype`` is the compute dtype, ``param_dtype`` the parameters' dtype; ``scan_layers``/``remat``: see
    :func:`sora_jax.models.common.scan_blocks`.
    """
    return build_decoder(LlamaForTask, LlamaConfig, hf_config, task, dtype, dense_fn, param_dtype, scan_layers, remat)


FAMILY = ModelFamily(
    model_types=("llama",),
    build=build,
    tasks=TASKS,
    base_model_prefix="model",
    layer_stack="layers",
    head_prefixes=("lm_head", "score"),
    # Rotary buffers (not persistent in current transformers, present in some older checkpoints).
    ignore_hf_keys=(r"(^|\.)rotary_emb\.(original_)?inv_freq$",),
    # Tying: with tie_word_embeddings=True the module has no lm_head parameter at all (logits use the
    # input embedding), and a checkpoint's redundant ``lm_head.weight`` is a head the model lacks. With
    # tie_word_embeddings=False and no ``lm_head.weight`` in the checkpoint, ``lm_head/kernel`` is
    # filled from the input embedding (transposed by the kernel layout).
    tied=(("lm_head/kernel", "model/embed_tokens/embedding"),),
)
