"""LLaMA (Llama 2 / Llama 3 style decoder) in Flax, numerically equal to ``transformers``' ``LlamaModel``.

Modules: :class:`LlamaModel` (the decoder stack) and :class:`LlamaForTask` (``base``, ``causal_lm``,
``sequence_classification`` with the last non-padding token pooled through ``score``). The
architecture: RMSNorm (computed in float32), rotary position embeddings (``default``, ``linear`` and
``llama3`` frequency scaling), grouped-query attention (``num_key_value_heads``), a SwiGLU MLP
(``down_proj(act(gate_proj(x)) * up_proj(x))``), optional ``attention_bias`` / ``mlp_bias``, a causal
mask combined with a ``(batch, seq)`` padding ``attention_mask`` (left or right padding), and tied or
untied output embeddings. For decoding, a key/value cache (:func:`init_cache`) is passed in and the
updated one returned (``cache``, ``cache_index``), a pure function as everything else.

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

from sora_jax.activations import ACTIVATIONS
from sora_jax.models.attention import dot_product_attention
from sora_jax.models.common import Linear, ModelFamily, at_layer, scan_blocks
from sora_jax.ops import default_dense

Array = jax.Array

ROPE_TYPES = ("default", "linear", "llama3")
TASKS = ("base", "causal_lm", "sequence_classification")
LayerCache = dict  # one layer's key/value cache: {"k", "v": (batch, cache_length, kv_heads, head_dim)}


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
        d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
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
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        num_labels = d.get("num_labels") or len(d.get("id2label") or {}) or 2
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            hidden_act=d.get("hidden_act", "silu"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            initializer_range=d.get("initializer_range", 0.02),
            rope_theta=float(rope.get("rope_theta") or d.get("rope_theta") or 10000.0),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings")
                or d.get("original_max_position_embeddings")
                or d.get("max_position_embeddings", 2048)
            ),
            attention_bias=bool(d.get("attention_bias", False)),
            attention_dropout=float(d.get("attention_dropout", 0.0)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            pad_token_id=d.get("pad_token_id"),
            num_labels=int(num_labels),
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


def rope_cos_sin(position_ids: Array, inv_freq: np.ndarray, dtype: Any) -> tuple[Array, Array]:
    """``cos, sin: (batch, seq, head_dim)`` for ``position_ids: (batch, seq)``, computed in float32."""
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: Array) -> Array:
    """``[x1, x2] -> [-x2, x1]`` on the last axis (halves, not interleaved pairs, as Hugging Face)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x: (batch, seq, heads, head_dim)`` by ``cos, sin: (batch, seq, head_dim)``."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    """``scale * (x / sqrt(mean(x^2) + eps))``, normalised in float32 then cast back (as Hugging Face).

    Params: ``scale (d,)``. Output dtype: ``dtype``.
    """

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class _Block(nn.Module):
    """Fields every LLaMA module shares."""

    config: LlamaConfig
    dense_fn: Callable[..., Array] = default_dense
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def linear(self, features: int, use_bias: bool, name: str) -> Linear:
        return Linear(
            features,
            use_bias=use_bias,
            dense_fn=self.dense_fn,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(self.config.initializer_range),
            name=name,
        )


class LlamaAttention(_Block):
    """Grouped-query self-attention with rotary embeddings.

    Params: ``q_proj (hidden, heads*head_dim)``, ``k_proj``/``v_proj (hidden, kv_heads*head_dim)``,
    ``o_proj (heads*head_dim, hidden)`` (biases with ``attention_bias``).
    """

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
        """``x: (batch, seq, hidden)``, ``mask: (batch, 1, seq, keys)`` bool (True = attend); ``keys`` is
        ``seq``, or the cache length with a ``cache`` (``x`` is then written at ``cache_index``).
        Returns ``(output (batch, seq, hidden), the updated cache or None)``."""
        c = self.config
        b, t, _ = x.shape
        q = self.linear(c.num_attention_heads * c.head_dim, c.attention_bias, "q_proj")(x)
        k = self.linear(c.num_key_value_heads * c.head_dim, c.attention_bias, "k_proj")(x)
        v = self.linear(c.num_key_value_heads * c.head_dim, c.attention_bias, "v_proj")(x)
        q = apply_rope(q.reshape(b, t, c.num_attention_heads, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, c.num_key_value_heads, c.head_dim), cos, sin)
        v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
        k, v, cache = update_cache(cache, k, v, cache_index)
        # Logits and softmax in float32; query head h reads key/value head h // (heads / kv_heads).
        rng = None if deterministic or c.attention_dropout == 0.0 else self.make_rng("dropout")
        out = dot_product_attention(q, k, v, mask=mask, scale=c.head_dim**-0.5, dropout_rate=c.attention_dropout,
                                    dropout_rng=rng)
        out = out.reshape(b, t, c.num_attention_heads * c.head_dim)
        return self.linear(c.hidden_size, c.attention_bias, "o_proj")(out), cache


class LlamaMLP(_Block):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``.

    Params: ``gate_proj``/``up_proj (hidden, intermediate)``, ``down_proj (intermediate, hidden)``.
    """

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        gate = self.linear(c.intermediate_size, c.mlp_bias, "gate_proj")(x)
        up = self.linear(c.intermediate_size, c.mlp_bias, "up_proj")(x)
        return self.linear(c.hidden_size, c.mlp_bias, "down_proj")(ACTIVATIONS[c.hidden_act](gate) * up)


class LlamaDecoderLayer(_Block):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

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
        """As :class:`LlamaAttention`: ``(output (batch, seq, hidden), the updated cache or None)``;
        ``index``: the block's place in a scanned stack (``common.at_layer``)."""
        c = self.config
        kw = dict(config=c, dense_fn=at_layer(self.dense_fn, index), dtype=self.dtype, param_dtype=self.param_dtype)
        norm_kw = dict(eps=c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(**norm_kw, name="input_layernorm")(x)
        h, cache = LlamaAttention(**kw, name="self_attn")(h, cos, sin, mask, deterministic, cache, cache_index)
        x = x + h
        h = RMSNorm(**norm_kw, name="post_attention_layernorm")(x)
        return x + LlamaMLP(**kw, name="mlp")(h), cache


def decoder_mask(
    attention_mask: Array | None,
    batch: int,
    queries: int,
    keys: int,
    offset: Array | int = 0,
    window: int | None = None,
) -> Array:
    """Causal mask AND key padding mask: ``(batch, 1, queries, keys)`` bool, True where a query may attend.

    Query ``i`` sits at slot ``offset + i`` of the ``keys`` key slots (``offset = 0``, ``keys = queries``
    without a cache); it attends to slots ``j <= offset + i`` (and ``j > offset + i - window`` with a
    sliding ``window``, as ``transformers``' sliding-window layers). ``attention_mask: (batch, keys)``
    with 1 for real tokens and 0 for padding (``None``: no padding). Rows of padded queries may be all
    False; they get a uniform softmax and no NaN.
    """
    q = jnp.asarray(offset) + jnp.arange(queries)[:, None]
    k = jnp.arange(keys)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    return jnp.broadcast_to(allowed, (batch, 1, queries, keys))


def attention_mask_4d(attention_mask: Array | None, batch: int, seq: int) -> Array:
    """:func:`decoder_mask` without a cache: ``(batch, 1, seq, seq)``."""
    return decoder_mask(attention_mask, batch, seq, seq)


# -- key/value cache for decoding -------------------------------------------------------------------
def init_cache(config: Any, batch: int, length: int, dtype: Any = jnp.float32) -> list[LayerCache]:
    """An empty key/value cache, one ``{"k", "v": (batch, length, kv_heads, head_dim)}`` per layer, for
    any decoder config with ``num_hidden_layers``, ``num_key_value_heads`` and ``head_dim``."""
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_hidden_layers)]


def update_cache(
    cache: LayerCache | None, k: Array, v: Array, index: Array | int
) -> tuple[Array, Array, LayerCache | None]:
    """Write ``k, v: (batch, seq, kv_heads, head_dim)`` into ``cache`` at slot ``index``; returns the keys
    and values to attend to (the whole cache, or ``k, v`` themselves without one) and the new cache."""
    if cache is None:
        return k, v, None
    start = (0, jnp.asarray(index, jnp.int32), 0, 0)
    ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
    cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
    return ck.astype(k.dtype), cv.astype(v.dtype), {"k": ck, "v": cv}


def check_cache(cache: list[LayerCache], num_layers: int, attention_mask: Array | None, batch: int) -> int:
    """The cache length, after checking ``cache`` has a layer per decoder layer and ``attention_mask`` covers
    every cache slot (raises ``ValueError`` naming the fix)."""
    if len(cache) != num_layers:
        raise ValueError(
            f"cache has {len(cache)} layers, the model {num_layers}; build it with init_cache(config, ...)."
        )
    length = cache[0]["k"].shape[1]
    if attention_mask is None or tuple(jnp.shape(attention_mask)) != (batch, length):
        raise ValueError(
            f"with a cache, attention_mask must be (batch, cache_length) = {(batch, length)} (1 for every slot that "
            f"holds or will hold a real token); got {None if attention_mask is None else jnp.shape(attention_mask)}."
        )
    return length


def _check_inputs(input_ids: Array, attention_mask: Array | None, position_ids: Array | None) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}.")
    for name, a in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if a is not None and jnp.shape(a)[-1] != input_ids.shape[1]:
            raise ValueError(
                f"{name} shape {jnp.shape(a)} does not match input_ids shape {input_ids.shape}; "
                f"pass a (batch, seq) {name}."
            )


class LlamaModel(_Block):
    """The decoder stack (``transformers.LlamaModel``).

    Params: ``embed_tokens/embedding (vocab, hidden)``, ``layers_{i}/...``, ``norm/scale (hidden,)``.
    """

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
            self.layers = LlamaDecoderLayer(**kw)
        else:
            self.layers = [LlamaDecoderLayer(**kw) for _ in range(c.num_hidden_layers)]
        self.norm = RMSNorm(eps=c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        deterministic: bool = True,
        cache: list[LayerCache] | None = None,
        cache_index: Array | int = 0,
    ) -> dict[str, Any]:
        """``input_ids, attention_mask, position_ids: (batch, seq)`` -> ``{"last_hidden_state"}``.

        ``last_hidden_state: (batch, seq, hidden)`` (after the final norm).

        ``position_ids`` default to ``arange(seq)`` for every row (as Hugging Face, also with padding).
        With a ``cache`` (:func:`init_cache`), the tokens fill slots ``cache_index ...`` of it,
        ``attention_mask`` is ``(batch, cache_length)``, and the output holds the updated ``"cache"``.
        """
        _check_inputs(input_ids, attention_mask if cache is None else None, position_ids)
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = jnp.arange(t)[None, :] + jnp.asarray(cache_index)
        position_ids = jnp.broadcast_to(jnp.asarray(position_ids), (b, t))
        cos, sin = rope_cos_sin(position_ids, rope_inv_freq(self.config), self.dtype)
        c = self.config
        keys = t if cache is None else check_cache(cache, c.num_hidden_layers, attention_mask, b)
        mask = decoder_mask(attention_mask, b, t, keys, cache_index)
        h = self.embed_tokens(input_ids)
        if c.scan_layers:
            # the per-layer cache list is stacked for the scan and split again (a copy per call)
            stacked = None if cache is None else jax.tree.map(lambda *xs: jnp.stack(xs), *cache)
            h, stacked = scan_blocks(
                self.layers, h, c.num_hidden_layers, cos, sin, mask, deterministic, remat=c.remat,
                scanned={"cache": stacked}, cache_index=cache_index,
            )
            new_cache = [] if cache is None else [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(len(cache))]
        else:
            new_cache = []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else cache[i]
                h, layer_cache = layer(h, cos, sin, mask, deterministic, layer_cache, cache_index)
                new_cache.append(layer_cache)
        out: dict[str, Any] = {"last_hidden_state": self.norm(h)}
        if cache is not None:
            out["cache"] = new_cache
        return out

    def attend(self, h: Array) -> Array:
        """Tied output projection ``h @ embedding.T``: ``(..., hidden) -> (..., vocab)``."""
        return self.embed_tokens.attend(h)


def last_non_pad_index(input_ids: Array, pad_token_id: int | None) -> Array:
    """Index ``(batch,)`` of the rightmost token that is not ``pad_token_id`` (left or right padding).

    As Hugging Face: with no ``pad_token_id`` the last position (only for batch size 1).
    """
    b, t = input_ids.shape
    if pad_token_id is None:
        if b != 1:
            raise ValueError(
                "Sequence classification of batches larger than 1 needs config.pad_token_id to find "
                "the last real token; set pad_token_id in the config."
            )
        return jnp.full((b,), t - 1)
    return jnp.argmax(jnp.arange(t) * (input_ids != pad_token_id), axis=-1)


class LlamaForTask(_Block):
    """A LLaMA model for ``task`` in :data:`TASKS`; the decoder is the submodule ``model``.

    - ``"base"``: ``transformers.LlamaModel`` (parameters still under ``model/``, the checkpoint prefix);
      returns ``{"last_hidden_state": (batch, seq, hidden)}``.
    - ``"causal_lm"``: ``transformers.LlamaForCausalLM``; ``lm_head/kernel (hidden, vocab)``, absent with
      ``tie_word_embeddings`` (logits are then ``h @ embedding.T``); returns ``{"logits": (batch, seq,
      vocab), "last_hidden_state"}``.
    - ``"sequence_classification"``: ``transformers.LlamaForSequenceClassification``;
      ``score/kernel (hidden, num_labels)`` (no bias) applied at the last non-padding token (found from
      ``config.pad_token_id`` in ``input_ids``); returns ``{"logits": (batch, num_labels),
      "last_hidden_state"}``.

    Logits are computed in ``dtype`` and returned as float32.
    """

    task: str = "causal_lm"

    def setup(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r} for LLaMA; choose one of {TASKS}.")
        c = self.config
        self.model = LlamaModel(c, self.dense_fn, self.dtype, self.param_dtype)
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
        """``input_ids, attention_mask (1 = token, 0 = padding), position_ids: (batch, seq)``; ``cache``,
        ``cache_index`` as :meth:`LlamaModel.__call__` (the output then holds ``"cache"``);
        ``return_logits=False`` leaves the causal LM's ``(batch, seq, vocab)`` logits out (a loss that
        forms them chunk by chunk from ``last_hidden_state``: :func:`sora_jax.lm.chunked_cross_entropy`)."""
        base = self.model(input_ids, attention_mask, position_ids, deterministic, cache, cache_index)
        h = base["last_hidden_state"]
        out = dict(base)
        if self.task == "causal_lm" and return_logits:
            logits = self.model.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
            out["logits"] = logits.astype(jnp.float32)
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
) -> LlamaForTask:
    """A :class:`LlamaForTask` from a Hugging Face config (``transformers.LlamaConfig``, its
    ``config.json`` dict, or a :class:`LlamaConfig`); ``ModelFamily.build``.

    ``dtype`` is the compute dtype, ``param_dtype`` the parameters' dtype; ``scan_layers``/``remat``: see
    :func:`sora_jax.models.common.scan_blocks`.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r} for LLaMA; choose one of {TASKS}.")
    config = hf_config if isinstance(hf_config, LlamaConfig) else LlamaConfig.from_hf(hf_config)
    config = dataclasses.replace(config, scan_layers=scan_layers, remat=remat)
    return LlamaForTask(
        config=config, dense_fn=dense_fn or default_dense, dtype=dtype, param_dtype=param_dtype, task=task
    )


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
