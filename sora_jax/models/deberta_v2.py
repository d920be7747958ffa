"""DeBERTa-v2 / DeBERTa-v3 (Hugging Face ``model_type="deberta-v2"``) in Flax.

Numerically the same as ``transformers``' ``DebertaV2Model`` and ``DebertaV2ForSequenceClassification``:
disentangled attention (content->position ``c2p`` and position->content ``p2c`` terms,
``share_att_key``), log-bucketed relative positions (``position_buckets``), the normalised relative
embedding table (``norm_rel_ebd="layer_norm"``), the convolution after the first layer
(``conv_kernel_size > 0``), absolute position embeddings (``position_biased_input``), the embedding
projection (``embedding_size != hidden_size``), the context pooler and the classifier.

Parameter paths are the Hugging Face names (see :mod:`sora_jax.models.common`), always under
``deberta/`` (the Hugging Face ``base_model_prefix``), e.g.
``deberta/encoder/layer_0/attention/self/query_proj/kernel``, ``deberta/encoder/rel_embeddings/embedding``,
``pooler/dense/kernel``, ``classifier/bias``. The convolution's weight keeps the PyTorch layout
``(out, in / groups, kernel_size)`` under the leaf name ``weight`` (it is not a dense layer).

Shapes below: ``B`` batch, ``L`` sequence length, ``H`` heads, ``D`` head size, ``S`` the attention
span (``position_buckets`` when positive, else ``max_relative_positions``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.activations import ACTIVATIONS, activation
from sora_jax.models.common import Array, Dropout, Linear, ModelFamily
from sora_jax.ops import default_dense


@dataclasses.dataclass(frozen=True)
class DebertaV2Settings:
    """The hyper-parameters of a DeBERTa-v2 model, resolved as ``transformers`` resolves them.

    ``max_relative_positions`` is already replaced by ``max_position_embeddings`` when below 1.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    attention_head_size: int
    intermediate_size: int
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    relative_attention: bool = False
    max_relative_positions: int = 512
    position_buckets: int = -1
    pos_att_type: tuple[str, ...] = ()
    share_att_key: bool = False
    norm_rel_ebd: tuple[str, ...] = ("none",)
    position_biased_input: bool = True
    embedding_size: int = 0
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"
    pooler_hidden_size: int = 0
    pooler_dropout: float = 0.0
    pooler_hidden_act: str = "gelu"
    cls_dropout: float = 0.1
    num_labels: int = 2

    @property
    def att_span(self) -> int:
        """``S``: the number of relative-position buckets on each side."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

    @classmethod
    def from_hf(cls, hf_config: Any, num_labels: int | None = None) -> DebertaV2Settings:
        """From a ``transformers.DebertaV2Config`` (or its ``to_dict()``/``config.json`` mapping)."""
        get = _getter(hf_config)
        model_type = get("model_type", "deberta-v2")
        if model_type != "deberta-v2":
            raise ValueError(f"Expected a DeBERTa-v2 config (model_type 'deberta-v2'), got {model_type!r}.")
        hidden, heads = int(get("hidden_size", 1536)), int(get("num_attention_heads", 24))
        if hidden % heads != 0:
            raise ValueError(
                f"The hidden size ({hidden}) is not a multiple of the number of attention heads ({heads})."
            )
        pos_att_type = get("pos_att_type", None) or ()
        if isinstance(pos_att_type, str):
            pos_att_type = [x.strip() for x in pos_att_type.lower().split("|")]
        unknown = set(pos_att_type) - {"c2p", "p2c"}
        if unknown:
            raise ValueError(f"Unknown pos_att_type entries {sorted(unknown)}; use 'c2p' and/or 'p2c'.")
        max_rel = int(get("max_relative_positions", -1))
        max_pos = int(get("max_position_embeddings", 512))
        if num_labels is None:
            id2label = get("id2label", None)
            num_labels = len(id2label) if id2label else int(get("num_labels", 2))
        for field in ("hidden_act", "pooler_hidden_act", "conv_act"):
            name = get(field, None)
            if name is not None and name not in ACTIVATIONS:
                raise ValueError(f"{field}={name!r} is not supported by DeBERTa-v2; supported: {sorted(ACTIVATIONS)}.")
        cls_dropout = get("cls_dropout", None)
        hidden_dropout = float(get("hidden_dropout_prob", 0.1))
        return cls(
            vocab_size=int(get("vocab_size", 128100)),
            hidden_size=hidden,
            num_hidden_layers=int(get("num_hidden_layers", 24)),
            num_attention_heads=heads,
            attention_head_size=int(get("attention_head_size", hidden // heads)),
            intermediate_size=int(get("intermediate_size", 6144)),
            hidden_act=str(get("hidden_act", "gelu")),
            hidden_dropout_prob=hidden_dropout,
            attention_probs_dropout_prob=float(get("attention_probs_dropout_prob", 0.1)),
            max_position_embeddings=max_pos,
            type_vocab_size=int(get("type_vocab_size", 0)),
            initializer_range=float(get("initializer_range", 0.02)),
            layer_norm_eps=float(get("layer_norm_eps", 1e-7)),
            relative_attention=bool(get("relative_attention", False)),
            max_relative_positions=max_rel if max_rel >= 1 else max_pos,
            position_buckets=int(get("position_buckets", -1)),
            pos_att_type=tuple(pos_att_type),
            share_att_key=bool(get("share_att_key", False)),
            norm_rel_ebd=tuple(x.strip() for x in str(get("norm_rel_ebd", "none")).lower().split("|")),
            position_biased_input=bool(get("position_biased_input", True)),
            embedding_size=int(get("embedding_size", None) or hidden),
            conv_kernel_size=int(get("conv_kernel_size", 0) or 0),
            conv_groups=int(get("conv_groups", 1)),
            conv_act=str(get("conv_act", "tanh")),
            pooler_hidden_size=int(get("pooler_hidden_size", None) or hidden),
            pooler_dropout=float(get("pooler_dropout", 0.0)),
            pooler_hidden_act=str(get("pooler_hidden_act", "gelu")),
            cls_dropout=hidden_dropout if cls_dropout is None else float(cls_dropout),
            num_labels=int(num_labels),
        )


def _getter(hf_config: Any) -> Callable[[str, Any], Any]:
    if isinstance(hf_config, Mapping):
        return lambda name, default: hf_config.get(name, default)
    return lambda name, default: getattr(hf_config, name, default)


# ---------------------------------------------------------------------------------------------------
# Relative positions (static: computed with NumPy at trace time from the static sequence length)


def make_log_bucket_position(relative_pos: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """Log-bucket relative positions as ``transformers`` does (float32 arithmetic, same rounding).

    Positions with ``|p| <= bucket_size // 2`` stay; larger ones are mapped logarithmically so that
    ``max_position - 1`` lands on ``bucket_size - 1``.
    """
    rel = np.asarray(relative_pos, dtype=np.int64)
    mid = bucket_size // 2
    sign = np.sign(rel)
    abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel)).astype(np.float32)
    log_ratio = np.log(abs_pos / np.float32(mid)) / np.log(np.float32((max_position - 1) / mid))
    log_pos = np.ceil(log_ratio * np.float32(mid - 1)) + np.float32(mid)
    return np.where(abs_pos <= mid, rel.astype(np.float32), log_pos * sign).astype(np.int64)


def build_relative_position(
    query_size: int, key_size: int, bucket_size: int = -1, max_position: int = -1
) -> np.ndarray:
    """``R[i, j] = i - j`` (log-bucketed when both sizes are positive): ``(query_size, key_size)`` int64."""
    rel = np.arange(query_size, dtype=np.int64)[:, None] - np.arange(key_size, dtype=np.int64)[None, :]
    if bucket_size > 0 and max_position > 0:
        rel = make_log_bucket_position(rel, bucket_size, max_position)
    return rel


# ---------------------------------------------------------------------------------------------------
# Modules


class _Base(nn.Module):
    """Fields shared by every module: the settings, compute/parameter dtypes and the dense function."""

    config: DebertaV2Settings
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dense_fn: Callable[..., Array] = default_dense

    @property
    def kw(self) -> dict[str, Any]:
        """Keyword arguments that hand the shared fields to a child module."""
        return dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype, dense_fn=self.dense_fn)

    def dense(self, features: int, name: str, use_bias: bool = True, input_act: str | None = None) -> Linear:
        """A :class:`Linear` ``(d_in, features)`` named ``name`` running ``self.dense_fn`` (on ``act(x)`` with
        ``input_act``)."""
        return Linear(
            features,
            use_bias=use_bias,
            input_act=input_act,
            dense_fn=self.dense_fn,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(self.config.initializer_range),
            name=name,
        )

    def layer_norm(self, name: str, dtype: Any = None) -> nn.LayerNorm:
        """PyTorch's ``LayerNorm`` (two-pass variance: the one-pass form loses digits at ``eps=1e-7``)."""
        return nn.LayerNorm(
            epsilon=self.config.layer_norm_eps,
            dtype=dtype or self.dtype,
            param_dtype=self.param_dtype,
            use_fast_variance=False,
            name=name,
        )

    def embed(self, num: int, features: int, name: str, dtype: Any = None) -> nn.Embed:
        """An embedding table ``(num, features)`` named ``name``."""
        return nn.Embed(
            num,
            features,
            dtype=dtype or self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(self.config.initializer_range),
            name=name,
        )


class DisentangledSelfAttention(_Base):
    """Disentangled self-attention (HF ``DisentangledSelfAttention``).

    Params: ``query_proj``, ``key_proj``, ``value_proj`` ``(hidden, H*D)``; with relative attention
    and ``share_att_key=False`` also ``pos_key_proj`` (for c2p) and ``pos_query_proj`` (for p2c)
    ``(hidden, H*D)``. With ``share_att_key=True`` the relative embeddings go through ``key_proj`` /
    ``query_proj`` (so ``dense_fn`` sees those paths twice).
    """

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        pair_mask: Array,
        relative_pos: np.ndarray | None,
        rel_embeddings: Array | None,
        deterministic: bool = True,
    ) -> Array:
        """``hidden_states (B, L, hidden)``, ``pair_mask (B, 1, L, L)`` bool, ``relative_pos (L, L)``,
        ``rel_embeddings (2S, hidden)`` -> context ``(B, L, H*D)``."""
        cfg = self.config
        heads, head_size = cfg.num_attention_heads, cfg.attention_head_size
        batch, length, _ = hidden_states.shape

        def split(x: Array) -> Array:  # (..., H*D) -> (..., H, D)
            return x.reshape(*x.shape[:-1], heads, head_size)

        all_head = heads * head_size
        query_proj, key_proj = self.dense(all_head, "query_proj"), self.dense(all_head, "key_proj")
        query = split(query_proj(hidden_states))  # (B, L, H, D)
        key = split(key_proj(hidden_states))
        value = split(self.dense(all_head, "value_proj")(hidden_states))

        # HF counts c2p/p2c in the scale even when relative attention is off.
        scale_factor = 1 + ("c2p" in cfg.pos_att_type) + ("p2c" in cfg.pos_att_type)
        scale = jnp.sqrt(jnp.float32(head_size * scale_factor)).astype(query.dtype)  # cast as HF does
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key / scale)  # (B, H, L, L)

        if cfg.relative_attention:
            rel_emb = Dropout(cfg.hidden_dropout_prob)(rel_embeddings, deterministic=deterministic)
            rel_emb = rel_emb[: 2 * cfg.att_span].astype(self.dtype)
            if cfg.share_att_key:
                pos_query_proj, pos_key_proj = query_proj, key_proj
            else:
                has_c2p, has_p2c = "c2p" in cfg.pos_att_type, "p2c" in cfg.pos_att_type
                pos_key_proj = self.dense(all_head, "pos_key_proj") if has_c2p else None
                pos_query_proj = self.dense(all_head, "pos_query_proj") if has_p2c else None
            if relative_pos is None:
                relative_pos = build_relative_position(length, length, cfg.position_buckets, cfg.max_relative_positions)
            span = cfg.att_span
            rows = np.arange(length)[:, None]
            if "c2p" in cfg.pos_att_type:
                pos_key = split(pos_key_proj(rel_emb))  # (2S, H, D)
                c2p_att = jnp.einsum("bqhd,phd->bhqp", query, pos_key)  # (B, H, L, 2S)
                c2p_pos = np.clip(relative_pos + span, 0, 2 * span - 1)  # (L, L)
                scores = scores + c2p_att[:, :, rows, c2p_pos] / scale
            if "p2c" in cfg.pos_att_type:
                pos_query = split(pos_query_proj(rel_emb))  # (2S, H, D)
                p2c_att = jnp.einsum("bkhd,phd->bhkp", key, pos_query)  # (B, H, L, 2S)
                p2c_pos = np.clip(-relative_pos + span, 0, 2 * span - 1)  # (L, L), rows index keys
                scores = scores + jnp.swapaxes(p2c_att[:, :, rows, p2c_pos], -1, -2) / scale

        scores = jnp.where(pair_mask, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        probs = Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, value)
        return context.reshape(batch, length, all_head)


class DebertaV2Output(_Base):
    """``LayerNorm(dropout(dense(x)) + residual)``; params ``dense (d_in, hidden)``, ``LayerNorm``.

    Serves as HF ``DebertaV2SelfOutput`` (``attention/output``) and ``DebertaV2Output`` (``output``, with
    ``input_act``: ``dense`` applies the activation to ``x`` first, see :class:`DebertaV2Intermediate`).
    """

    input_act: str | None = None

    @nn.compact
    def __call__(self, x: Array, residual: Array, deterministic: bool = True) -> Array:
        """``x (B, L, d_in)``, ``residual (B, L, hidden)`` -> ``(B, L, hidden)``."""
        y = self.dense(self.config.hidden_size, "dense", input_act=self.input_act)(x)
        y = Dropout(self.config.hidden_dropout_prob)(y, deterministic=deterministic)
        return self.layer_norm("LayerNorm")(y + residual)


class DebertaV2Attention(_Base):
    """``self`` (disentangled attention) + ``output`` (dense, residual, LayerNorm)."""

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        pair_mask: Array,
        relative_pos: np.ndarray | None,
        rel_embeddings: Array | None,
        deterministic: bool = True,
    ) -> Array:
        """``(B, L, hidden) -> (B, L, hidden)``."""
        context = DisentangledSelfAttention(**self.kw, name="self")(
            hidden_states, pair_mask, relative_pos, rel_embeddings, deterministic
        )
        return DebertaV2Output(**self.kw, name="output")(context, hidden_states, deterministic)


class DebertaV2Intermediate(_Base):
    """``dense(x)``; params ``dense (hidden, intermediate)``. Returns the pre-activation: the activation runs
    as the next layer's ``input_act`` (``output/dense``; see ``sora_jax.models.common``)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``(B, L, hidden) -> (B, L, intermediate)``."""
        return self.dense(self.config.intermediate_size, "dense")(x)


class DebertaV2Layer(_Base):
    """One transformer layer: ``attention``, ``intermediate``, ``output``."""

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        pair_mask: Array,
        relative_pos: np.ndarray | None,
        rel_embeddings: Array | None,
        deterministic: bool = True,
    ) -> Array:
        """``(B, L, hidden) -> (B, L, hidden)``."""
        attention_output = DebertaV2Attention(**self.kw, name="attention")(
            hidden_states, pair_mask, relative_pos, rel_embeddings, deterministic
        )
        pre = DebertaV2Intermediate(**self.kw, name="intermediate")(attention_output)
        return DebertaV2Output(**self.kw, input_act=self.config.hidden_act, name="output")(
            pre, attention_output, deterministic
        )


class Conv1d(nn.Module):
    """``torch.nn.Conv1d`` with padding ``(k - 1) // 2`` on each side, on channels-last input.

    Params: ``weight (out, in / groups, k)`` (the PyTorch layout), ``bias (out,)``.
    """

    features: int
    kernel_size: int
    groups: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., Array] = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``(B, L, in) -> (B, L + 2 * ((k - 1) // 2) - k + 1, out)``."""
        if x.shape[-1] % self.groups:
            raise ValueError(
                f"conv_groups={self.groups} does not divide the {x.shape[-1]} channels; "
                "use a conv_groups that divides hidden_size."
            )
        shape = (self.features, x.shape[-1] // self.groups, self.kernel_size)
        weight = self.param("weight", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        pad = (self.kernel_size - 1) // 2
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            weight.astype(self.dtype),
            window_strides=(1,),
            padding=[(pad, pad)],
            dimension_numbers=("NWC", "OIW", "NWC"),
            feature_group_count=self.groups,
        )
        return y + bias.astype(y.dtype)


class ConvLayer(_Base):
    """HF ``ConvLayer``, run after the first layer when ``conv_kernel_size > 0``.

    Params: ``conv`` (:class:`Conv1d`, ``weight (hidden, hidden / conv_groups, k)``), ``LayerNorm``.
    """

    @nn.compact
    def __call__(self, hidden_states: Array, residual: Array, input_mask: Array, deterministic: bool) -> Array:
        """``hidden_states`` (embedding output), ``residual`` (layer-0 output) ``(B, L, hidden)``,
        ``input_mask (B, L)`` -> ``(B, L, hidden)``."""
        cfg = self.config
        if cfg.conv_kernel_size % 2 == 0:
            raise NotImplementedError(
                f"conv_kernel_size={cfg.conv_kernel_size}: an even kernel shortens the sequence (the "
                "PyTorch model fails on it too); use an odd conv_kernel_size."
            )
        out = Conv1d(
            cfg.hidden_size,
            cfg.conv_kernel_size,
            cfg.conv_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(cfg.initializer_range),
            name="conv",
        )(hidden_states)
        padded = (1 - input_mask) != 0  # (B, L), as HF's ``(1 - input_mask).bool()``
        out = jnp.where(padded[..., None], jnp.zeros((), out.dtype), out)
        out = activation(cfg.conv_act)(Dropout(cfg.hidden_dropout_prob)(out, deterministic=deterministic))
        output = self.layer_norm("LayerNorm")(residual + out)
        return output * input_mask[..., None].astype(output.dtype)


class DebertaV2Embeddings(_Base):
    """Params: ``word_embeddings (vocab, E)``, ``position_embeddings (max_pos, E)`` when
    ``position_biased_input``, ``token_type_embeddings (types, E)`` when ``type_vocab_size > 0``,
    ``embed_proj (E, hidden)`` (no bias) when ``E != hidden``, ``LayerNorm``."""

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        token_type_ids: Array,
        position_ids: Array,
        mask: Array,
        deterministic: bool = True,
    ) -> Array:
        """``input_ids, token_type_ids, position_ids, mask (B, L)`` -> ``(B, L, hidden)``."""
        cfg = self.config
        size = cfg.embedding_size
        embeddings = self.embed(cfg.vocab_size, size, "word_embeddings")(input_ids)
        if cfg.position_biased_input:
            embeddings += self.embed(cfg.max_position_embeddings, size, "position_embeddings")(position_ids)
        if cfg.type_vocab_size > 0:
            embeddings += self.embed(cfg.type_vocab_size, size, "token_type_embeddings")(token_type_ids)
        if size != cfg.hidden_size:
            embeddings = self.dense(cfg.hidden_size, "embed_proj", use_bias=False)(embeddings)
        embeddings = self.layer_norm("LayerNorm")(embeddings)
        embeddings = embeddings * mask[..., None].astype(embeddings.dtype)
        return Dropout(cfg.hidden_dropout_prob)(embeddings, deterministic=deterministic)


class DebertaV2Encoder(_Base):
    """Params: ``layer_{i}``; with relative attention ``rel_embeddings (2S, hidden)``; ``LayerNorm``
    when ``norm_rel_ebd`` has ``layer_norm``; ``conv`` when ``conv_kernel_size > 0``."""

    @nn.compact
    def __call__(self, hidden_states: Array, attention_mask: Array, deterministic: bool = True) -> Array:
        """``hidden_states (B, L, hidden)``, ``attention_mask (B, L)`` -> ``(B, L, hidden)``."""
        cfg = self.config
        length = hidden_states.shape[1]
        mask = attention_mask.astype(bool)
        pair_mask = mask[:, None, None, :] & mask[:, None, :, None]  # (B, 1, L, L): query and key
        relative_pos, rel_embeddings = None, None
        norm_rel = "layer_norm" in cfg.norm_rel_ebd
        if cfg.relative_attention:
            relative_pos = build_relative_position(length, length, cfg.position_buckets, cfg.max_relative_positions)
            rows = jnp.arange(2 * cfg.att_span)
            rel_embeddings = self.embed(2 * cfg.att_span, cfg.hidden_size, "rel_embeddings", jnp.float32)(rows)
            if norm_rel:
                rel_embeddings = self.layer_norm("LayerNorm", jnp.float32)(rel_embeddings)  # (2S, hidden)
        elif norm_rel:
            # HF builds this LayerNorm whatever relative_attention says; declare it so that checkpoints
            # round-trip (its output is unused and compiled away).
            self.layer_norm("LayerNorm", jnp.float32)(jnp.zeros((1, cfg.hidden_size), jnp.float32))
        output = hidden_states
        for i in range(cfg.num_hidden_layers):
            output = DebertaV2Layer(**self.kw, name=f"layer_{i}")(
                output, pair_mask, relative_pos, rel_embeddings, deterministic
            )
            if i == 0 and cfg.conv_kernel_size > 0:
                output = ConvLayer(**self.kw, name="conv")(hidden_states, output, attention_mask, deterministic)
        return output


class DebertaV2Backbone(_Base):
    """HF ``DebertaV2Model`` (``embeddings`` + ``encoder``): the ``deberta`` subtree of our models."""

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """``input_ids (B, L)`` int, ``attention_mask (B, L)`` (1 = token, 0 = padding) ->
        last hidden state ``(B, L, hidden)``."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length); got shape {input_ids.shape}.")
        shape = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones(shape, jnp.int32)
        if attention_mask.shape != shape:
            raise ValueError(
                f"attention_mask must be (batch, length) like input_ids {shape}; got {attention_mask.shape}."
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros(shape, jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(shape[1]), shape)
        embeddings = DebertaV2Embeddings(**self.kw, name="embeddings")(
            input_ids, token_type_ids, position_ids, attention_mask, deterministic
        )
        return DebertaV2Encoder(**self.kw, name="encoder")(embeddings, attention_mask, deterministic)


class ContextPooler(_Base):
    """``act(dense(dropout(h[:, 0])))``; params ``dense (hidden, pooler_hidden)``."""

    @nn.compact
    def __call__(self, hidden_states: Array, deterministic: bool = True) -> Array:
        """``(B, L, hidden) -> (B, pooler_hidden)``."""
        cfg = self.config
        token = Dropout(cfg.pooler_dropout)(hidden_states[:, 0], deterministic=deterministic)
        return activation(cfg.pooler_hidden_act)(self.dense(cfg.pooler_hidden_size, "dense")(token))


class DebertaV2Model(_Base):
    """Task ``"base"``: ``{"last_hidden_state": (B, L, hidden)}``; params under ``deberta/``.

    Call with ``input_ids (B, L)``, optional ``attention_mask``, ``token_type_ids``, ``position_ids``
    ``(B, L)`` and ``deterministic`` (dropout off; when False pass ``rngs={"dropout": key}``).
    """

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        hidden = DebertaV2Backbone(**self.kw, name="deberta")(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic
        )
        return {"last_hidden_state": hidden}


class DebertaV2ForSequenceClassification(_Base):
    """Task ``"sequence_classification"``: ``{"logits": (B, num_labels) float32, "last_hidden_state"}``.

    Params: ``deberta/...``, ``pooler/dense``, ``classifier (hidden, num_labels)``. With
    ``num_labels == 1`` the single logit is a regression output (the loss is the caller's). Called
    as :class:`DebertaV2Model`.
    """

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        cfg = self.config
        hidden = DebertaV2Backbone(**self.kw, name="deberta")(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic
        )
        pooled = ContextPooler(**self.kw, name="pooler")(hidden, deterministic)
        pooled = Dropout(cfg.cls_dropout)(pooled, deterministic=deterministic)
        logits = self.dense(cfg.num_labels, "classifier")(pooled)
        return {"logits": logits.astype(jnp.float32), "last_hidden_state": hidden}


TASKS: dict[str, type[_Base]] = {
    "base": DebertaV2Model,
    "sequence_classification": DebertaV2ForSequenceClassification,
}


def build(
    hf_config: Any,
    task: str = "sequence_classification",
    dtype: Any = jnp.float32,
    dense_fn: Callable[..., Array] | None = default_dense,
    param_dtype: Any = jnp.float32,
    *,
    num_labels: int | None = None,
) -> nn.Module:
    """The Flax module for a Hugging Face DeBERTa-v2/v3 config (``ModelFamily.build``).

    Args:
      hf_config: a ``transformers.DebertaV2Config`` or its dict (``config.json``).
      task: ``"base"`` or ``"sequence_classification"``.
      dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``).
      dense_fn: the dense function every :class:`~sora_jax.models.common.Linear` runs (None: default).
      param_dtype: dtype of freshly initialised parameters.
      num_labels: classifier outputs (default: the config's ``num_labels``); 1 means regression.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not supported by DeBERTa-v2; supported: {tuple(TASKS)}")
    return TASKS[task](
        config=DebertaV2Settings.from_hf(hf_config, num_labels=num_labels),
        dtype=dtype,
        param_dtype=param_dtype,
        dense_fn=dense_fn or default_dense,
    )


FAMILY = ModelFamily(
    model_types=("deberta-v2",),
    build=build,
    tasks=tuple(TASKS),
    base_model_prefix="deberta",
    head_prefixes=("pooler", "classifier"),
    # Checkpoint entries that are not parameters of these models: the position-id buffer, the absolute
    # position table that DeBERTa-v3 checkpoints carry although ``position_biased_input`` is off (HF
    # ignores it too; a model that has the table still reads it), and pre-training heads.
    ignore_hf_keys=(
        r"(.*\.)?embeddings\.position_ids$",
        r"(.*\.)?embeddings\.position_embeddings\.weight$",
        r"^(deberta\.)?(lm_predictions|mask_predictions|cls)\.",
    ),
)
