"""BERT and RoBERTa encoders in Flax linen, parameter-compatible with Hugging Face ``transformers``.

Parameter paths follow :mod:`sora_jax.models.common`'s naming convention, for example
``bert/encoder/layer_0/attention/self/query/kernel`` ``(hidden, hidden)`` and
``bert/embeddings/word_embeddings/embedding`` ``(vocab, hidden)``. The base model always lives under
its ``base_model_prefix`` (``bert`` or ``roberta``), in the ``"base"`` task too, so adapter targets
are the same for every task.

Heads (``"sequence_classification"``):

- BERT: ``bert/pooler/dense`` (tanh of the first token), dropout, ``classifier`` ``(hidden, num_labels)``.
- RoBERTa: no pooler; ``classifier/dense`` + tanh, ``classifier/out_proj`` on the first token
  (with dropout before each), as ``RobertaClassificationHead``.

RoBERTa's position ids count non-padding tokens and start at ``pad_token_id + 1``.
``num_labels == 1`` is regression (the logits are the prediction); the loss is the caller's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sora_jax.activations import ACTIVATIONS
from sora_jax.models.attention import dot_product_attention
from sora_jax.models.common import Dropout, Linear, ModelFamily, at_layer, scan_blocks
from sora_jax.ops import default_dense

Array = jax.Array

TASKS = ("base", "sequence_classification")


@dataclasses.dataclass(frozen=True)
class BertSpec:
    """The hyper-parameters of a BERT/RoBERTa model (hashable; built from a ``transformers`` config)."""

    model_type: str  # "bert" or "roberta": also the base model's parameter prefix
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    num_labels: int = 2
    # execution, not architecture (not in a transformers config): the encoder's blocks under nn.scan,
    # with this rematerialisation policy (sora_jax.models.common.scan_blocks)
    scan_layers: bool = False
    remat: str = "none"

    @property
    def is_roberta(self) -> bool:
        return self.model_type == "roberta"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: Any) -> BertSpec:
        """From a ``transformers`` ``BertConfig``/``RobertaConfig``; unsupported options raise ValueError."""
        model_type = "roberta" if config.model_type in ROBERTA_FAMILY.model_types else "bert"
        pos_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if pos_type != "absolute":
            raise ValueError(
                f"position_embedding_type={pos_type!r} is not supported by sora_jax's BERT; only 'absolute' is"
            )
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError("decoder/cross-attention BERT configs are not supported; use an encoder config")
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                f"{config.num_attention_heads}"
            )
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            hidden_dropout_prob=config.hidden_dropout_prob,
            attention_probs_dropout_prob=config.attention_probs_dropout_prob,
            classifier_dropout=getattr(config, "classifier_dropout", None),
            max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=config.type_vocab_size,
            layer_norm_eps=config.layer_norm_eps,
            initializer_range=config.initializer_range,
            pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0,
            num_labels=config.num_labels,
        )


class _Base(nn.Module):
    """Shared fields of every submodule."""

    spec: BertSpec
    dense_fn: Callable[..., Array] = default_dense
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def linear(self, features: int, name: str, input_act: str | None = None) -> Linear:
        return Linear(
            features,
            input_act=input_act,
            dense_fn=self.dense_fn,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(self.spec.initializer_range),
            name=name,
        )

    def layer_norm(self, name: str = "LayerNorm") -> nn.LayerNorm:
        return nn.LayerNorm(epsilon=self.spec.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def embed(self, num: int, name: str) -> nn.Embed:
        return nn.Embed(
            num,
            self.spec.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(self.spec.initializer_range),
            name=name,
        )


def roberta_position_ids(input_ids: Array, padding_idx: int) -> Array:
    """RoBERTa's position ids ``(B, T)``: non-padding tokens count from ``padding_idx + 1``, padding
    tokens get ``padding_idx`` (``create_position_ids_from_input_ids`` in ``transformers``)."""
    mask = (input_ids != padding_idx).astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask + padding_idx


class Embeddings(_Base):
    """Word + position + token-type embeddings, LayerNorm, dropout. Returns ``(B, T, hidden)``."""

    @nn.compact
    def __call__(
        self, input_ids: Array, token_type_ids: Array | None, position_ids: Array | None, deterministic: bool
    ) -> Array:
        s = self.spec
        if position_ids is None:
            if s.is_roberta:
                position_ids = roberta_position_ids(input_ids, s.pad_token_id)
            else:
                position_ids = jnp.arange(input_ids.shape[1])[None, :]
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embed(s.vocab_size, "word_embeddings")(input_ids)
        x = x + self.embed(s.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = x + self.embed(s.max_position_embeddings, "position_embeddings")(position_ids)
        x = self.layer_norm()(x)
        return Dropout(s.hidden_dropout_prob)(x, deterministic=deterministic)


class SelfAttention(_Base):
    """Multi-head self-attention (``query``/``key``/``value``). ``bias``: additive mask ``(B, 1, 1, T)``.

    Returns the attention output ``(B, T, hidden)`` before the output projection.
    """

    @nn.compact
    def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
        s = self.spec
        B, T, _ = x.shape
        split = lambda y: y.reshape(B, T, s.num_attention_heads, s.head_dim)  # noqa: E731
        q = split(self.linear(s.hidden_size, "query")(x))
        k = split(self.linear(s.hidden_size, "key")(x))
        v = split(self.linear(s.hidden_size, "value")(x))
        rate = s.attention_probs_dropout_prob
        rng = None if deterministic or rate == 0.0 else self.make_rng("dropout")
        out = dot_product_attention(q, k, v, bias=bias, dropout_rate=rate, dropout_rng=rng)
        return out.reshape(B, T, s.hidden_size)


class Output(_Base):
    """``dense`` -> dropout -> ``LayerNorm(x + residual)`` (``BertSelfOutput`` / ``BertOutput``); with
    ``input_act``, ``dense`` applies that activation to ``x`` first (``BertOutput``, see ``Intermediate``)."""

    input_act: str | None = None

    @nn.compact
    def __call__(self, x: Array, residual: Array, deterministic: bool) -> Array:
        x = self.linear(self.spec.hidden_size, "dense", self.input_act)(x)
        x = Dropout(self.spec.hidden_dropout_prob)(x, deterministic=deterministic)
        return self.layer_norm()(x + residual)


class Attention(_Base):
    """``self`` (attention) + ``output`` (projection, residual, LayerNorm)."""

    @nn.compact
    def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
        kw = dict(spec=self.spec, dense_fn=self.dense_fn, dtype=self.dtype, param_dtype=self.param_dtype)
        a = SelfAttention(**kw, name="self")(x, bias, deterministic)
        return Output(**kw, name="output")(a, x, deterministic)


class Layer(_Base):
    """One encoder block: attention, ``intermediate/dense`` + activation, ``output``; ``index``: its place in a
    scanned stack (``common.at_layer``)."""

    @nn.compact
    def __call__(self, x: Array, bias: Array, deterministic: bool, index: Array | None = None) -> Array:
        dense_fn = at_layer(self.dense_fn, index)
        kw = dict(spec=self.spec, dense_fn=dense_fn, dtype=self.dtype, param_dtype=self.param_dtype)
        x = Attention(**kw, name="attention")(x, bias, deterministic)
        pre = Intermediate(**kw, name="intermediate")(x)
        return Output(**kw, input_act=self.spec.hidden_act, name="output")(pre, x, deterministic)


class Intermediate(_Base):
    """``dense`` ``(hidden, intermediate)``. Returns the pre-activation: the activation runs as the next
    layer's ``input_act`` (``output/dense``; see ``sora_jax.models.common``)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return self.linear(self.spec.intermediate_size, "dense")(x)


class Encoder(_Base):
    """``layer_0`` ... ``layer_{L-1}``; with ``spec.scan_layers`` one scanned ``layer`` (leaves ``(L, ...)``)."""

    @nn.compact
    def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
        kw = dict(spec=self.spec, dense_fn=self.dense_fn, dtype=self.dtype, param_dtype=self.param_dtype)
        n = self.spec.num_hidden_layers
        if self.spec.scan_layers:
            x, _ = scan_blocks(Layer(**kw, name="layer"), x, n, bias, deterministic, remat=self.spec.remat)
            return x
        for i in range(n):
            x = Layer(**kw, name=f"layer_{i}")(x, bias, deterministic)
        return x


class Pooler(_Base):
    """``tanh(dense(x[:, 0]))``: ``(B, T, hidden) -> (B, hidden)``."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return jnp.tanh(self.linear(self.spec.hidden_size, "dense")(x[:, 0]))


class BertModel(_Base):
    """``BertModel``/``RobertaModel``: embeddings, encoder and (when ``add_pooler``) the pooler."""

    add_pooler: bool = True

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None,
        token_type_ids: Array | None,
        position_ids: Array | None,
        deterministic: bool,
    ) -> tuple[Array, Array | None]:
        kw = dict(spec=self.spec, dense_fn=self.dense_fn, dtype=self.dtype, param_dtype=self.param_dtype)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        # additive mask (B, 1, 1, T), float32 (attention logits are float32 for every compute dtype):
        # 0 where attended, float32's minimum where padded (as transformers)
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        x = Embeddings(**kw, name="embeddings")(input_ids, token_type_ids, position_ids, deterministic)
        x = Encoder(**kw, name="encoder")(x, bias, deterministic)
        pooled = Pooler(**kw, name="pooler")(x) if self.add_pooler else None
        return x, pooled


class ClassificationHead(_Base):
    """RoBERTa's head: dropout, ``dense`` + tanh, dropout, ``out_proj``, on the first token."""

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        s = self.spec
        rate = s.classifier_dropout if s.classifier_dropout is not None else s.hidden_dropout_prob
        x = Dropout(rate)(x[:, 0], deterministic=deterministic)
        x = jnp.tanh(self.linear(s.hidden_size, "dense")(x))
        x = Dropout(rate)(x, deterministic=deterministic)
        return self.linear(s.num_labels, "out_proj")(x)


class BertForTask(_Base):
    """A BERT/RoBERTa model for ``task`` in :data:`TASKS`.

    Call with ``input_ids (B, T)`` int, optional ``attention_mask (B, T)`` (1 = token, 0 = padding),
    ``token_type_ids (B, T)``, ``position_ids (B, T)``, ``deterministic`` (dropout off; when False,
    pass ``rngs={"dropout": key}``). Returns a dict:

    - ``"base"``: ``last_hidden_state (B, T, hidden)`` and, where the model has a pooler,
      ``pooler_output (B, hidden)``;
    - ``"sequence_classification"``: ``logits (B, num_labels)`` (float32) and ``last_hidden_state``.
    """

    task: str = "sequence_classification"

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        s = self.spec
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not supported by {s.model_type}; supported: {TASKS}")
        kw = dict(spec=s, dense_fn=self.dense_fn, dtype=self.dtype, param_dtype=self.param_dtype)
        add_pooler = self.task == "base" or not s.is_roberta
        hidden, pooled = BertModel(**kw, add_pooler=add_pooler, name=s.model_type)(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic
        )
        out = {"last_hidden_state": hidden}
        if self.task == "base":
            if pooled is not None:
                out["pooler_output"] = pooled
            return out
        if s.is_roberta:
            logits = ClassificationHead(**kw, name="classifier")(hidden, deterministic)
        else:
            rate = s.classifier_dropout if s.classifier_dropout is not None else s.hidden_dropout_prob
            x = Dropout(rate)(pooled, deterministic=deterministic)
            logits = self.linear(s.num_labels, "classifier")(x)
            out["pooler_output"] = pooled
        out["logits"] = logits.astype(jnp.float32)
        return out


def build(
    hf_config: Any,
    task: str = "sequence_classification",
    dtype: Any = jnp.float32,
    dense_fn: Callable[..., Array] = default_dense,
    param_dtype: Any = jnp.float32,
    *,
    scan_layers: bool = False,
    remat: str = "none",
) -> BertForTask:
    """A :class:`BertForTask` for a ``transformers`` BERT/RoBERTa config (``ModelFamily.build``);
    ``scan_layers``/``remat``: see :func:`sora_jax.models.common.scan_blocks`."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not supported by BERT/RoBERTa; supported: {TASKS}")
    return BertForTask(
        spec=dataclasses.replace(BertSpec.from_hf(hf_config), scan_layers=scan_layers, remat=remat),
        task=task,
        dtype=dtype,
        param_dtype=param_dtype,
        dense_fn=dense_fn or default_dense,
    )


# buffers and pre-training heads that a checkpoint may hold and these models never use
_IGNORE = (
    r"(.*\.)?embeddings\.position_ids$",
    r"(.*\.)?embeddings\.token_type_ids$",
    r"^cls\.",  # BertForPreTraining / BertForMaskedLM heads
    r"^lm_head\.",  # RobertaForMaskedLM head
)

BERT_FAMILY = ModelFamily(
    model_types=("bert",),
    build=build,
    tasks=TASKS,
    base_model_prefix="bert",
    head_prefixes=("classifier",),
    ignore_hf_keys=_IGNORE,
    layer_stack="encoder/layer",
)

ROBERTA_FAMILY = ModelFamily(
    model_types=("roberta", "xlm-roberta"),
    build=build,
    tasks=TASKS,
    base_model_prefix="roberta",
    head_prefixes=("classifier",),
    # RobertaForSequenceClassification has no pooler: a base checkpoint's pooler is left unused, and
    # a base model loaded from a classification checkpoint gets a fresh one (as in transformers)
    ignore_hf_keys=(*_IGNORE, r"^roberta\.pooler\."),
    init_if_missing=("roberta/pooler",),
    layer_stack="encoder/layer",
)

FAMILY = BERT_FAMILY
FAMILIES = (BERT_FAMILY, ROBERTA_FAMILY)
