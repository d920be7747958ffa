"""The decoder skeleton LLaMA and Gemma share, written once; each family subclasses it with what differs.

Shared here: rotary embeddings applied to queries and keys (:func:`apply_rope`), the causal (optionally
sliding-window) padding mask (:func:`decoder_mask`), the key/value cache (:func:`init_cache`,
:func:`update_cache`), grouped-query attention (:class:`DecoderAttention`), the gated MLP
(:class:`GatedMLP`), the pre-norm block (:class:`DecoderLayer`, with Gemma 2/3's "sandwich" norms as an
option), the stack with its embedding, layers (looped or under ``nn.scan``) and final norm
(:class:`DecoderStack`), the task heads (:class:`DecoderForTask`) and :func:`build_decoder`.

A family sets, as class attributes and small methods of its subclasses: the norm (``norm_cls``), the
rotary frequencies and sliding window of each layer type (:meth:`DecoderStack.inv_freq`,
:meth:`DecoderStack.window`), the embedding scale, QK-norm and the attention kernel
(:meth:`DecoderAttention.normalize_qk`, :meth:`DecoderAttention.attend`) and the final logits.

Parameter paths are the Hugging Face names (``model/layers_0/self_attn/q_proj/kernel``,
``model/embed_tokens/embedding``, ``model/norm/scale``, ``lm_head/kernel``, ``score/kernel``): every
submodule is named explicitly, so they do not depend on the Python class that holds them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.activations import ACTIVATIONS
from sora_jax.models.attention import dot_product_attention, rotary_attention, rotate
from sora_jax.models.common import Linear, at_layer, scan_blocks
from sora_jax.ops import default_dense

Array = jax.Array

TASKS = ("base", "causal_lm", "sequence_classification")
FULL, SLIDING = "full_attention", "sliding_attention"
LayerCache = dict  # one layer's key/value cache: {"k", "v": (batch, cache_length, kv_heads, head_dim)}


def check_config(config: Any) -> None:
    """The checks every decoder config makes: grouped heads divide, an even ``head_dim`` (rotary
    embeddings rotate halves), a known ``hidden_act``; a ``ValueError`` naming the fix."""
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({config.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({config.num_key_value_heads}); fix the config."
        )
    if config.head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {config.head_dim}.")
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"Unsupported hidden_act {config.hidden_act!r}; supported: {sorted(ACTIVATIONS)}.")


def hf_dict(hf_config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A ``transformers`` config (or its ``config.json`` dict) as a plain dict."""
    return dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()


def hf_common(d: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields every decoder family reads alike from a Hugging Face config dict ``d`` (sizes,
    grouped heads, norm epsilon, initialisation, attention bias and dropout, padding id, labels)."""
    heads = d["num_attention_heads"]
    return dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        initializer_range=d.get("initializer_range", 0.02),
        attention_bias=bool(d.get("attention_bias", False)),
        attention_dropout=float(d.get("attention_dropout", 0.0)),
        pad_token_id=d.get("pad_token_id"),
        num_labels=int(d.get("num_labels") or len(d.get("id2label") or {}) or 2),
    )


# -- norms ---------------------------------------------------------------------------------------------
def rms_normalise(x: Array, eps: float) -> Array:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, in float32 (the RMSNorms' shared part)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


# -- rotary embeddings ---------------------------------------------------------------------------------
def rope_cos_sin(position_ids: Array, inv_freq: np.ndarray, dtype: Any) -> tuple[Array, Array]:
    """``cos, sin: (batch, seq, head_dim)`` for ``position_ids: (batch, seq)``, computed in float32."""
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x: (batch, seq, heads, head_dim)`` by ``cos, sin: (batch, seq, head_dim)``."""
    return rotate(x, cos[:, :, None, :], sin[:, :, None, :])


# -- masks ---------------------------------------------------------------------------------------------
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


def check_inputs(input_ids: Array, attention_mask: Array | None, position_ids: Array | None) -> None:
    """``input_ids`` is ``(batch, seq)`` and the mask and positions match it (``ValueError`` otherwise)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}.")
    for name, a in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if a is not None and jnp.shape(a)[-1] != input_ids.shape[1]:
            raise ValueError(
                f"{name} shape {jnp.shape(a)} does not match input_ids shape {input_ids.shape}; "
                f"pass a (batch, seq) {name}."
            )


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


# -- modules ---------------------------------------------------------------------------------------------
class DecoderModule(nn.Module):
    """Fields every decoder module shares; ``norm_cls``: the family's RMSNorm (``eps``, ``dtype``,
    ``param_dtype``; parameter ``scale (d,)``; called with ``as_input=True`` it returns ``(fn, scale)``, a
    hashable function and its parameter, for the next dense layers to apply: ``input_norm``)."""

    config: Any
    dense_fn: Callable[..., Array] = default_dense
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    norm_cls: ClassVar[type[nn.Module] | None] = None

    def linear(self, features: int, use_bias: bool, name: str, input_act: str | None = None) -> Linear:
        """A dense layer named ``name`` running ``dense_fn``, initialised ``normal(initializer_range)``;
        ``input_act``: see :class:`Linear`."""
        return Linear(
            features,
            use_bias=use_bias,
            dense_fn=self.dense_fn,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(self.config.initializer_range),
            input_act=input_act,
            name=name,
        )

    def norm_layer(self, name: str | None = None) -> nn.Module:
        """The family's RMSNorm, named ``name``."""
        assert self.norm_cls is not None, f"{type(self).__name__} sets no norm_cls"
        return self.norm_cls(eps=self.config.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class DecoderAttention(DecoderModule):
    """Grouped-query self-attention with rotary embeddings.

    Params: ``q_proj (hidden, heads*head_dim)``, ``k_proj``/``v_proj (hidden, kv_heads*head_dim)``,
    ``o_proj (heads*head_dim, hidden)`` (biases with ``attention_bias``), and whatever
    :meth:`normalize_qk` adds.
    """

    def normalize_qk(self, q: Array, k: Array) -> tuple[Array, Array]:
        """Queries ``(B, T, heads, head_dim)`` and keys ``(B, T, kv_heads, head_dim)`` before the rotary
        embedding; unchanged here (Gemma 3 normalises them)."""
        return q, k

    def scale(self) -> float:
        """The logits' scale, ``head_dim ** -0.5``."""
        return self.config.head_dim**-0.5

    def logit_softcap(self) -> float | None:
        """The attention logits' cap ``c`` (``c tanh(x / c)``, Gemma 2); ``None`` here."""
        return None

    def rotates_inside(self) -> bool:
        """Whether, without a cache, :meth:`attend` may take the projections' outputs as they are and
        normalise (:meth:`rotary_qk_norm`) and rotate ``q`` and ``k`` itself
        (:func:`sora_jax.models.attention.rotary_attention`): the backward then keeps the very arrays the
        projections returned. Not with another attention kernel."""
        return True

    def rotary_qk_norm(self, q: Array) -> tuple[Any, Array, Array] | None:
        """:meth:`normalize_qk` as ``(norm, q_scale, k_scale)`` for ``rotary_attention`` (``q`` the flat
        queries, for the shapes); ``None`` here."""
        return None

    def attend(
        self, q: Array, k: Array, v: Array, mask: Array, rng: Array | None, rotary: tuple[Array, Array] | None = None
    ) -> Array:
        """``softmax(cap(Q K^T scale) + mask) V`` (:meth:`scale`, :meth:`logit_softcap`): ``q (B, T, H, D)``,
        ``k, v (B, S, K, D)``, ``mask (B, 1, T, S)`` -> ``(B, T, H, D)``; logits and softmax in float32, query
        head ``h`` reads key/value head ``h // (H / K)``. With ``rotary = (cos, sin)`` (:meth:`rotates_inside`):
        ``q (B, T, H * D)``, ``k, v (B, T, K * D)`` unrotated -> ``(B, T, H * D)``."""
        c = self.config
        kw = dict(
            mask=mask, scale=self.scale(), dropout_rate=c.attention_dropout, dropout_rng=rng,
            logit_softcap=self.logit_softcap(),
        )
        if rotary is not None:
            qk_norm = self.rotary_qk_norm(q)
            return rotary_attention(
                q, k, v, *rotary, c.num_attention_heads, c.num_key_value_heads, qk_norm=qk_norm, **kw
            )
        return dot_product_attention(q, k, v, **kw)

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
        input_norm: Any = None,
    ) -> tuple[Array, LayerCache | None]:
        """``x: (batch, seq, hidden)``, ``mask: (batch, 1, seq, keys)`` bool (True = attend); ``keys`` is
        ``seq``, or the cache length with a ``cache`` (``x`` is then written at ``cache_index``).
        ``input_norm``: ``(norm, scale)``, the projections' input is ``norm(x, scale)`` (see :class:`Linear`).
        Returns ``(output (batch, seq, hidden), the updated cache or None)``."""
        c = self.config
        b, t, _ = x.shape
        kv = c.num_key_value_heads * c.head_dim
        q = self.linear(c.num_attention_heads * c.head_dim, c.attention_bias, "q_proj")(x, input_norm=input_norm)
        k = self.linear(kv, c.attention_bias, "k_proj")(x, input_norm=input_norm)
        v = self.linear(kv, c.attention_bias, "v_proj")(x, input_norm=input_norm)
        rng = None if deterministic or c.attention_dropout == 0.0 else self.make_rng("dropout")
        if cache is None and self.rotates_inside():
            out = self.attend(q, k, v, mask, rng, rotary=(cos, sin))
        else:
            q = q.reshape(b, t, c.num_attention_heads, c.head_dim)
            k = k.reshape(b, t, c.num_key_value_heads, c.head_dim)
            v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
            q, k = self.normalize_qk(q, k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k, v, cache = update_cache(cache, k, v, cache_index)
            out = self.attend(q, k, v, mask, rng)
        out = out.reshape(b, t, c.num_attention_heads * c.head_dim)
        return self.linear(c.hidden_size, c.attention_bias, "o_proj")(out), cache


class GatedMLP(DecoderModule):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` (SwiGLU with ``silu``, GeGLU with a GELU).

    Params: ``gate_proj``/``up_proj (hidden, intermediate)``, ``down_proj (intermediate, hidden)``
    (biases with ``mlp_bias``). ``down_proj`` is handed both factors (``gate=``, see
    :mod:`sora_jax.models.common`), so the backward keeps ``gate`` and ``up``, not their product as well.
    """

    @nn.compact
    def __call__(self, x: Array, input_norm: Any = None) -> Array:
        """``input_norm``: ``(norm, scale)``, ``gate_proj``'s and ``up_proj``'s input is ``norm(x, scale)``."""
        c = self.config
        gate = self.linear(c.intermediate_size, c.mlp_bias, "gate_proj")(x, input_norm=input_norm)
        up = self.linear(c.intermediate_size, c.mlp_bias, "up_proj")(x, input_norm=input_norm)
        return self.linear(c.hidden_size, c.mlp_bias, "down_proj", input_act=c.hidden_act)(up, gate=gate)


class DecoderLayer(DecoderModule):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``; with :meth:`sandwich_norms`
    ``x + norm(attn(norm(x)))``, then ``x + norm(mlp(norm(x)))``.

    Params: ``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp`` (and
    ``pre_feedforward_layernorm``, ``post_feedforward_layernorm`` with sandwich norms).
    """

    attention_cls: ClassVar[type[DecoderAttention]] = DecoderAttention
    mlp_cls: ClassVar[type[GatedMLP]] = GatedMLP

    def sandwich_norms(self) -> bool:
        """Norms after attention and around the MLP (Gemma 2 and 3)."""
        return False

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
        """As :class:`DecoderAttention`: ``(output (batch, seq, hidden), the updated cache or None)``;
        ``index``: the block's place in a scanned stack (``common.at_layer``)."""
        c = self.config
        kw = dict(config=c, dense_fn=at_layer(self.dense_fn, index), dtype=self.dtype, param_dtype=self.param_dtype)
        # the pre-norms are handed to the projections (``input_norm``), which normalise ``x`` themselves
        norm = self.norm_layer("input_layernorm")(x, as_input=True)
        h, cache = self.attention_cls(**kw, name="self_attn")(
            x, cos, sin, mask, deterministic, cache, cache_index, input_norm=norm
        )
        if self.sandwich_norms():
            x = x + self.norm_layer("post_attention_layernorm")(h)
            norm = self.norm_layer("pre_feedforward_layernorm")(x, as_input=True)
            h = self.norm_layer("post_feedforward_layernorm")(self.mlp_cls(**kw, name="mlp")(x, input_norm=norm))
            return x + h, cache
        x = x + h
        norm = self.norm_layer("post_attention_layernorm")(x, as_input=True)
        return x + self.mlp_cls(**kw, name="mlp")(x, input_norm=norm), cache


class DecoderStack(DecoderModule):
    """The decoder stack: embedding, ``num_hidden_layers`` blocks (``layer_cls``; under ``nn.scan`` with
    ``config.scan_layers``), final norm.

    Params: ``embed_tokens/embedding (vocab, hidden)``, ``layers_{i}/...`` (scanned: ``layers/...``
    stacked ``(L, ...)``), ``norm/scale (hidden,)``.
    """

    layer_cls: ClassVar[type[DecoderLayer]] = DecoderLayer

    def layer_types(self) -> tuple[str, ...]:
        """One entry per layer, ``"full_attention"`` or ``"sliding_attention"``; here all full."""
        return (FULL,) * self.config.num_hidden_layers

    def inv_freq(self, layer_type: str) -> np.ndarray:
        """The rotary inverse frequencies ``(head_dim // 2,)`` of ``layer_type``'s layers."""
        raise NotImplementedError

    def window(self, layer_type: str) -> int | None:
        """The sliding window of ``layer_type``'s layers (``None``: the whole causal past)."""
        return None

    def embed_scale(self) -> Array | None:
        """A factor on the input embeddings (``None``: none)."""
        return None

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
            self.layers = self.layer_cls(**kw)
        else:
            self.layers = [self.layer_cls(**kw) for _ in range(c.num_hidden_layers)]
        self.norm = self.norm_layer()

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
        c = self.config
        check_inputs(input_ids, attention_mask if cache is None else None, position_ids)
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = jnp.arange(t)[None, :] + jnp.asarray(cache_index)
        position_ids = jnp.broadcast_to(jnp.asarray(position_ids), (b, t))
        keys = t if cache is None else check_cache(cache, c.num_hidden_layers, attention_mask, b)
        kinds = self.layer_types()
        rope, masks = {}, {}
        for kind in sorted(set(kinds)):
            rope[kind] = rope_cos_sin(position_ids, self.inv_freq(kind), self.dtype)
            masks[kind] = decoder_mask(attention_mask, b, t, keys, cache_index, self.window(kind))
        h = self.embed_tokens(input_ids)
        scale = self.embed_scale()
        if scale is not None:
            h = h * scale
        if c.scan_layers:
            h, new_cache = self._scanned(h, kinds, rope, masks, deterministic, cache, cache_index)
        else:
            new_cache = []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else cache[i]
                h, layer_cache = layer(h, *rope[kinds[i]], masks[kinds[i]], deterministic, layer_cache, cache_index)
                new_cache.append(layer_cache)
        out: dict[str, Any] = {"last_hidden_state": self.norm(h)}
        if cache is not None:
            out["cache"] = new_cache
        return out

    def _scanned(
        self,
        h: Array,
        kinds: tuple[str, ...],
        rope: dict,
        masks: dict,
        deterministic: bool,
        cache: list | None,
        cache_index: Array | int,
    ) -> tuple[Array, list]:
        """The blocks under ``nn.scan``; with several layer types each block gets its type's rotary table and
        mask as scanned inputs (stacked per layer), else one broadcast pair. The per-layer cache list is
        stacked for the scan and split again (a copy per call)."""
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
            self.layers,
            h,
            self.config.num_hidden_layers,
            remat=self.config.remat,
            scanned=per_layer,
            deterministic=deterministic,
            cache_index=cache_index,
            **shared,
        )
        return h, [] if cache is None else [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(len(cache))]

    def attend(self, h: Array) -> Array:
        """Tied output projection ``h @ embedding.T``: ``(..., hidden) -> (..., vocab)``."""
        return self.embed_tokens.attend(h)


class DecoderForTask(DecoderModule):
    """A decoder (``model_cls``, the submodule ``model``) for ``task`` in :data:`TASKS`.

    - ``"base"``: the stack alone (parameters still under ``model/``, the checkpoint prefix); returns
      ``{"last_hidden_state": (batch, seq, hidden)}``.
    - ``"causal_lm"``: ``lm_head/kernel (hidden, vocab)``, absent with ``tie_word_embeddings`` (logits are
      then ``h @ embedding.T``); returns ``{"logits": (batch, seq, vocab), "last_hidden_state"}``.
    - ``"sequence_classification"``: ``score/kernel (hidden, num_labels)`` (no bias) applied at the last
      non-padding token (found from ``config.pad_token_id`` in ``input_ids``); returns ``{"logits":
      (batch, num_labels), "last_hidden_state"}``.

    Logits are computed in ``dtype`` and returned as float32 (causal-LM logits through
    :meth:`lm_logits`).
    """

    task: str = "causal_lm"

    model_cls: ClassVar[type[DecoderStack]] = DecoderStack
    family: ClassVar[str] = "decoder"

    def lm_logits(self, logits: Array) -> Array:
        """The causal LM's logits ``(batch, seq, vocab)`` as returned: float32."""
        return logits.astype(jnp.float32)

    def setup(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r} for {self.family}; choose one of {TASKS}.")
        c = self.config
        self.model = self.model_cls(c, self.dense_fn, self.dtype, self.param_dtype)
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
        logits_to_keep: int = 0,
    ) -> dict[str, Any]:
        """``input_ids, attention_mask (1 = token, 0 = padding), position_ids: (batch, seq)``; ``cache``,
        ``cache_index`` as :meth:`DecoderStack.__call__` (the output then holds ``"cache"``);
        ``return_logits=False`` leaves the causal LM's ``(batch, seq, vocab)`` logits out (a loss that
        forms them chunk by chunk from ``last_hidden_state``: :func:`sora_jax.lm.chunked_cross_entropy`);
        ``logits_to_keep=k > 0``: the logits of the last ``k`` positions only, ``(batch, k, vocab)``
        (``transformers``' argument of that name: a prefill needs one position's, not ``seq x vocab``)."""
        base = self.model(input_ids, attention_mask, position_ids, deterministic, cache, cache_index)
        h = base["last_hidden_state"]
        out = dict(base)
        if self.task == "causal_lm" and return_logits:
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
            logits = self.model.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
            out["logits"] = self.lm_logits(logits)
        elif self.task == "sequence_classification":
            pooled = h[jnp.arange(h.shape[0]), last_non_pad_index(input_ids, self.config.pad_token_id)]
            out["logits"] = self.score(pooled).astype(jnp.float32)
        return out


def build_decoder(
    task_cls: type[DecoderForTask],
    config_cls: type,
    hf_config: Mapping[str, Any] | Any,
    task: str,
    dtype: Any,
    dense_fn: Callable[..., Array] | None,
    param_dtype: Any,
    scan_layers: bool,
    remat: str,
) -> DecoderForTask:
    """``task_cls`` for ``task`` from a Hugging Face config (``config_cls.from_hf``) or a ``config_cls``,
    with the execution settings ``scan_layers``/``remat`` (:func:`sora_jax.models.common.scan_blocks`)."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r} for {task_cls.family}; choose one of {TASKS}.")
    config = hf_config if isinstance(hf_config, config_cls) else config_cls.from_hf(hf_config)
    config = dataclasses.replace(config, scan_layers=scan_layers, remat=remat)
    return task_cls(config=config, dense_fn=dense_fn or default_dense, dtype=dtype, param_dtype=param_dtype, task=task)
