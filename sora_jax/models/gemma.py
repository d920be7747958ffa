"""Gemma, Gemma 2 and Gemma 3 (text) decoders in Flax, numerically equal to ``transformers``' models.

One module serves the three ``model_type`` values ``gemma``, ``gemma2`` and ``gemma3_text``; they share
LLaMA's skeleton (rotary embeddings, grouped-query attention, a gated MLP: :mod:`sora_jax.models.llama`)
and differ from it by:

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

from sora_jax.activations import ACTIVATIONS
from sora_jax.models.attention import dot_product_attention
from sora_jax.models.common import ModelFamily, at_layer, scan_blocks
from sora_jax.models.llama import (
    LayerCache,
    LlamaConfig,
    LlamaMLP,
    _Block,
    _check_inputs,
    apply_rope,
    check_cache,
    decoder_mask,
    last_non_pad_index,
    rope_cos_sin,
    rope_inv_freq,
    update_cache,
)
from sora_jax.ops import default_dense

Array = jax.Array

TASKS = ("base", "causal_lm", "sequence_classification")
VARIANTS = ("gemma", "gemma2", "gemma3_text")
LAYER_TYPES = ("full_attention", "sliding_attention")
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
    mlp_bias: bool = False  # Gemma has none; LlamaMLP reads it
    # execution, not architecture: the blocks under nn.scan (sora_jax.models.common.scan_blocks)
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"Unsupported Gemma variant {self.variant!r}; supported: {VARIANTS}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}); fix the config."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Unsupported hidden_act {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}.")
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
        d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
        variant = d.get("model_type", "gemma")
        if variant == "gemma3":
            raise ValueError(
                "model_type 'gemma3' is the multimodal Gemma 3; load its text model (model_type 'gemma3_text', "
                "e.g. a GGUF file or the config's text_config)."
            )
        if d.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True (an embedding model) is not supported; use a causal LM.")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        layers = d["num_hidden_layers"]
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
            layer_types = ["full_attention"] * layers
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if variant == "gemma" and act == "gelu":  # transformers' GemmaConfig maps the legacy name the same way
            act = "gelu_pytorch_tanh"
        num_labels = d.get("num_labels") or len(d.get("id2label") or {}) or 2
        return cls(
            variant=variant,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            hidden_act=act,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            initializer_range=d.get("initializer_range", 0.02),
            rope_theta=float(rope.get("rope_theta") or d.get("rope_theta") or 10000.0),
            rope_type=rope.get("rope_type", rope.get("type", "default")),
            rope_factor=float(rope.get("factor", 1.0)),
            local_rope_theta=local_theta,
            attention_bias=bool(d.get("attention_bias", False)),
            attention_dropout=float(d.get("attention_dropout", 0.0)),
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or head_dim)
            if variant != "gemma"
            else float(head_dim),
            sliding_window=d.get("sliding_window"),
            layer_types=tuple(layer_types),
            attn_logit_softcapping=d.get("attn_logit_softcapping") if variant == "gemma2" else None,
            final_logit_softcapping=d.get("final_logit_softcapping") if variant != "gemma" else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            pad_token_id=d.get("pad_token_id"),
            num_labels=int(num_labels),
        )


def softcap(x: Array, cap: float | None) -> Array:
    """``cap * tanh(x / cap)`` (``x`` itself when ``cap`` is None)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class GemmaRMSNorm(nn.Module):
    """``(x / sqrt(mean(x^2) + eps)) * (1 + scale)`` in float32, cast to ``dtype`` (as Hugging Face).

    Params: ``scale (d,)``, initialised to 0.
    """

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)


def softcapped_attention(
    q: Array, k: Array, v: Array, mask: Array, scale: float, cap: float, dropout_rate: float, dropout_rng: Array | None
) -> Array:
    """``softmax(cap tanh(Q K^T scale / cap) + mask) V`` with grouped heads (Gemma 2), by autodiff.

    ``q: (B, T, H, D)``, ``k, v: (B, S, K, D)``, ``mask: (B, 1, T, S)`` bool; returns ``(B, T, H, D)``.
    """
    (b, t, h, d), kv = q.shape, k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, :, None], softcap(logits, cap), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


class GemmaAttention(_Block):
    """Grouped-query self-attention with rotary embeddings (QK-norm in Gemma 3, logit soft-capping in
    Gemma 2). Params: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` as LLaMA; ``q_norm``/``k_norm
    (head_dim,)`` in Gemma 3."""

    @nn.compact
    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        mask: Array,
        deterministic: bool = True,
        cache: LayerCache | None = None,
        cache_index: Array | int = 0,
    ) -> tuple[Array, LayerCache | None]:
        """As :class:`sora_jax.models.llama.LlamaAttention`."""
        c = self.config
        b, t, _ = x.shape
        q = self.linear(c.num_attention_heads * c.head_dim, c.attention_bias, "q_proj")(x)
        k = self.linear(c.num_key_value_heads * c.head_dim, c.attention_bias, "k_proj")(x)
        v = self.linear(c.num_key_value_heads * c.head_dim, c.attention_bias, "v_proj")(x)
        q = q.reshape(b, t, c.num_attention_heads, c.head_dim)
        k = k.reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:
            norm_kw = dict(eps=c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
            q = GemmaRMSNorm(**norm_kw, name="q_norm")(q)
            k = GemmaRMSNorm(**norm_kw, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v, cache = update_cache(cache, k, v, cache_index)
        rng = None if deterministic or c.attention_dropout == 0.0 else self.make_rng("dropout")
        scale = c.query_pre_attn_scalar**-0.5
        if c.attn_logit_softcapping is None:
            out = dot_product_attention(
                q, k, v, mask=mask, scale=scale, dropout_rate=c.attention_dropout, dropout_rng=rng
            )
        else:
            out = softcapped_attention(q, k, v, mask, scale, c.attn_logit_softcapping, c.attention_dropout, rng)
        out = out.reshape(b, t, c.num_attention_heads * c.head_dim)
        return self.linear(c.hidden_size, c.attention_bias, "o_proj")(out), cache


class GemmaDecoderLayer(_Block):
    """Gemma: ``x + attn(norm(x))``, ``x + mlp(norm(x))``. Gemma 2/3: ``x + norm(attn(norm(x)))``,
    ``x + norm(mlp(norm(x)))``."""

    @nn.compact
    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        mask: Array,
        deterministic: bool = True,
        cache: LayerCache | None = None,
        cache_index: Array | int = 0,
        index: Array | None = None,
    ) -> tuple[Array, LayerCache | None]:
        c = self.config
        kw = dict(config=c, dense_fn=at_layer(self.dense_fn, index), dtype=self.dtype, param_dtype=self.param_dtype)
        norm_kw = dict(eps=c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        h = GemmaRMSNorm(**norm_kw, name="input_layernorm")(x)
        h, cache = GemmaAttention(**kw, name="self_attn")(h, cos, sin, mask, deterministic, cache, cache_index)
        if c.sandwich_norms:
            x = x + GemmaRMSNorm(**norm_kw, name="post_attention_layernorm")(h)
            h = GemmaRMSNorm(**norm_kw, name="pre_feedforward_layernorm")(x)
            h = GemmaRMSNorm(**norm_kw, name="post_feedforward_layernorm")(LlamaMLP(**kw, name="mlp")(h))
            return x + h, cache
        x = x + h
        h = GemmaRMSNorm(**norm_kw, name="post_attention_layernorm")(x)
        return x + LlamaMLP(**kw, name="mlp")(h), cache


class GemmaModel(_Block):
    """The decoder stack. Params: ``embed_tokens/embedding (vocab, hidden)``, ``layers_{i}/...``,
    ``norm/scale (hidden,)``."""

    def setup(self) -> None:
        c = self.config
        kw = dict(config=c, dense_fn=self.dense_fn, dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(c.initializer_range),
        )
        if c.scan_layers:
            self.layers = GemmaDecoderLayer(**kw)
        else:
            self.layers = [GemmaDecoderLayer(**kw) for _ in range(c.num_hidden_layers)]
        self.norm = GemmaRMSNorm(eps=c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        deterministic: bool = True,
        cache: list[LayerCache] | None = None,
        cache_index: Array | int = 0,
    ) -> dict[str, Any]:
        """As :meth:`sora_jax.models.llama.LlamaModel.__call__`."""
        c = self.config
        _check_inputs(input_ids, attention_mask if cache is None else None, position_ids)
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = jnp.arange(t)[None, :] + jnp.asarray(cache_index)
        position_ids = jnp.broadcast_to(jnp.asarray(position_ids), (b, t))
        keys = t if cache is None else check_cache(cache, c.num_hidden_layers, attention_mask, b)
        rope, masks = {}, {}
        for kind in sorted(set(c.layer_types)):
            rope[kind] = rope_cos_sin(position_ids, rope_inv_freq(c.rope(kind)), self.dtype)
            window = c.sliding_window if kind == "sliding_attention" else None
            masks[kind] = decoder_mask(attention_mask, b, t, keys, cache_index, window)
        scale = jnp.asarray(math.sqrt(c.hidden_size), self.param_dtype).astype(self.dtype)
        h = self.embed_tokens(input_ids) * scale
        if c.scan_layers:
            h, new_cache = self._scanned(h, rope, masks, deterministic, cache, cache_index)
        else:
            new_cache = []
            for i, layer in enumerate(self.layers):
                kind = c.layer_types[i]
                layer_cache = None if cache is None else cache[i]
                h, layer_cache = layer(h, *rope[kind], masks[kind], deterministic, layer_cache, cache_index)
                new_cache.append(layer_cache)
        out: dict[str, Any] = {"last_hidden_state": self.norm(h)}
        if cache is not None:
            out["cache"] = new_cache
        return out

    def _scanned(
        self, h: Array, rope: dict, masks: dict, deterministic: bool, cache: list | None, cache_index: Array | int
    ) -> tuple[Array, list]:
        """The blocks under ``nn.scan``; with several layer types each block gets its type's rotary table and
        mask as scanned inputs (stacked per layer), else one broadcast pair."""
        c = self.config
        kinds = c.layer_types
        stacked_cache = None if cache is None else jax.tree.map(lambda *xs: jnp.stack(xs), *cache)
        per_layer: dict[str, Any] = {"cache": stacked_cache}
        shared: dict[str, Any] = {}
        if len(set(kinds)) == 1:
            shared.update(cos=rope[kinds[0]][0], sin=rope[kinds[0]][1], mask=masks[kinds[0]])
        else:
            per_layer.update(
                cos=jnp.stack([rope[k][0] for k in kinds]),
                sin=jnp.stack([rope[k][1] for k in kinds]),
                mask=jnp.stack([masks[k] for k in kinds]),
            )
        h, stacked = scan_blocks(
            self.layers, h, c.num_hidden_layers, remat=c.remat, scanned=per_layer, deterministic=deterministic,
            cache_index=cache_index, **shared,
        )
        return h, [] if cache is None else [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(len(cache))]

    def attend(self, h: Array) -> Array:
        """Tied output projection ``h @ embedding.T``: ``(..., hidden) -> (..., vocab)``."""
        return self.embed_tokens.attend(h)


class GemmaForTask(_Block):
    """A Gemma-family model for ``task`` in :data:`TASKS`, as :class:`sora_jax.models.llama.LlamaForTask`
    (``lm_head/kernel`` only without ``tie_word_embeddings``; causal-LM logits soft-capped by
    ``final_logit_softcapping``)."""

    task: str = "causal_lm"

    def setup(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r} for Gemma; choose one of {TASKS}.")
        c = self.config
        self.model = GemmaModel(c, self.dense_fn, self.dtype, self.param_dtype)
        if self.task == "causal_lm" and not c.tie_word_embeddings:
            self.lm_head = self.linear(c.vocab_size, False, "lm_head")
        elif self.task == "sequence_classification":
            self.score = self.linear(c.num_labels, False, "score")

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        deterministic: bool = True,
        cache: list[LayerCache] | None = None,
        cache_index: Array | int = 0,
        return_logits: bool = True,
    ) -> dict[str, Any]:
        """As :meth:`sora_jax.models.llama.LlamaForTask.__call__`."""
        base = self.model(input_ids, attention_mask, position_ids, deterministic, cache, cache_index)
        h = base["last_hidden_state"]
        out = dict(base)
        if self.task == "causal_lm" and return_logits:
            logits = self.model.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
            out["logits"] = softcap(logits.astype(jnp.float32), self.config.final_logit_softcapping)
        elif self.task == "sequence_classification":
            pooled = h[jnp.arange(h.shape[0]), last_non_pad_index(input_ids, self.config.pad_token_id)]
            out["logits"] = self.score(pooled).astype(jnp.float32)
        return out


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
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r} for Gemma; choose one of {TASKS}.")
    config = hf_config if isinstance(hf_config, GemmaConfig) else GemmaConfig.from_hf(hf_config)
    config = dataclasses.replace(config, scan_layers=scan_layers, remat=remat)
    return GemmaForTask(
        config=config, dense_fn=dense_fn or default_dense, dtype=dtype, param_dtype=param_dtype, task=task
    )


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
