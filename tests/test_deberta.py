"""DeBERTa-v2/v3 Flax model against ``transformers``' PyTorch ``DebertaV2ForSequenceClassification``.

Tiny random configs are built offline; every PyTorch parameter is re-drawn (LayerNorm scales away
from 1, biases away from 0) so that a swapped or missing parameter cannot hide. Our parameters come
from the PyTorch state dict through ``sora_jax.convert``'s naming table alone (``hf_key`` +
``hf_layout``), and, separately, through ``save_pretrained`` -> ``sora_jax.load_pretrained``.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta

from sora_jax import convert, load_pretrained
from sora_jax.models import deberta_v2, get_family
from sora_jax.models.deberta_v2 import FAMILY, build, build_relative_position, make_log_bucket_position

# float32 on both sides: differences come from summation order only (~1e-6 measured); 1e-4 leaves
# room for platform differences while any wrong index, scale or mask gives errors of order 1e-1.
ATOL = 1e-4

_TINY = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    num_labels=3,
)
_RELATIVE = dict(
    relative_attention=True,
    pos_att_type=["p2c", "c2p"],
    position_buckets=4,  # smaller than the sequence length: log buckets are exercised
    max_relative_positions=16,
    norm_rel_ebd="layer_norm",
    position_biased_input=False,
    type_vocab_size=2,
)
CONFIGS = {
    # DeBERTa-v2 style: separate pos_key_proj / pos_query_proj
    "relative_unshared": {**_TINY, **_RELATIVE, "share_att_key": False},
    # DeBERTa-v3 style: relative embeddings through key_proj / query_proj
    "relative_shared": {**_TINY, **_RELATIVE, "share_att_key": True, "hidden_size": 48},
    # absolute positions only; pos_att_type still enters the score scale in HF, norm_rel_ebd still
    # declares encoder.LayerNorm
    "absolute": {
        **_TINY,
        "relative_attention": False,
        "position_biased_input": True,
        "pos_att_type": ["p2c", "c2p"],
        "norm_rel_ebd": "layer_norm",
    },
    # c2p only, no buckets (max_relative_positions from max_position_embeddings), the convolution
    # after layer 0, an embedding projection, a regression head
    "conv_embed_proj_regression": {
        **_TINY,
        "relative_attention": True,
        "pos_att_type": ["c2p"],
        "max_relative_positions": -1,
        "share_att_key": False,
        "position_biased_input": True,
        "conv_kernel_size": 3,
        "conv_groups": 2,
        "embedding_size": 24,
        "num_labels": 1,
    },
}


def _torch_model(kwargs: dict, seed: int = 0) -> transformers.DebertaV2ForSequenceClassification:
    torch.manual_seed(seed)
    model = transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def _batch(kwargs: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """3 sequences of length 12 with 12, 8 and 3 real tokens (right padding with id 0)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, kwargs["vocab_size"], size=(3, 12))
    mask = np.zeros((3, 12), np.int64)
    for row, n in enumerate((12, 8, 3)):
        mask[row, :n] = 1
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if kwargs.get("type_vocab_size", 0) > 0:
        batch["token_type_ids"] = rng.randint(0, kwargs["type_vocab_size"], size=(3, 12)) * mask
    return batch


def _params_from_state_dict(module, state_dict: dict[str, np.ndarray]) -> dict:
    """Our parameter tree from an HF state dict, by the naming table only (inverse of ``hf_key``)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params: dict = {}
    for path, shape in convert.iter_paths(shapes):
        value = convert.hf_layout(path, state_dict[convert.hf_key(path)])
        assert value.shape == shape.shape, (path, value.shape, shape.shape)
        convert.set_path(params, path, jnp.asarray(value))
    return params


def _torch_outputs(model, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in batch.items()}, output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


def _assert_close(ours: dict, logits: np.ndarray, hidden: np.ndarray, mask: np.ndarray, atol: float) -> None:
    np.testing.assert_allclose(np.asarray(ours["logits"], np.float32), logits, rtol=0, atol=atol)
    ours_hidden = np.asarray(ours["last_hidden_state"], np.float32)
    assert ours_hidden.shape == hidden.shape
    real = mask.astype(bool)  # padded positions carry no meaning; compare real tokens only
    np.testing.assert_allclose(ours_hidden[real], hidden[real], rtol=0, atol=atol)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    kwargs = CONFIGS[request.param]
    model = _torch_model(kwargs)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    batch = _batch(kwargs)
    return request.param, kwargs, model, state, batch, _torch_outputs(model, batch)


def test_parameter_names_mirror_transformers(case):
    name, kwargs, _, state, _, _ = case
    module = build(transformers.DebertaV2Config(**kwargs), "sequence_classification")
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    ours = {convert.hf_key(p) for p, _ in convert.iter_paths(shapes)}
    assert ours == set(state), (sorted(ours - set(state)), sorted(set(state) - ours))
    assert set(shapes) == {"deberta", "pooler", "classifier"}


def test_matches_transformers_float32(case):
    name, kwargs, model, state, batch, (logits, hidden) = case
    module = build(model.config, "sequence_classification")
    params = _params_from_state_dict(module, state)
    out = jax.jit(module.apply)({"params": params}, **{k: jnp.asarray(v) for k, v in batch.items()})
    assert out["logits"].shape == (3, kwargs["num_labels"])
    _assert_close(out, logits, hidden, batch["attention_mask"], ATOL)
    # padded positions follow HF too (fully masked query rows: a uniform softmax over all keys)
    np.testing.assert_allclose(np.asarray(out["last_hidden_state"]), hidden, rtol=0, atol=ATOL)

    base = build(model.config, "base")
    base_out = jax.jit(base.apply)({"params": {"deberta": params["deberta"]}}, **batch)
    assert set(base_out) == {"last_hidden_state"}
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(base_out["last_hidden_state"])[real], hidden[real], rtol=0, atol=ATOL)


@pytest.mark.parametrize(("length", "buckets", "max_position"), [(12, 4, 16), (40, 8, 24), (512, 256, 512)])
def test_log_buckets_match_transformers(length, buckets, max_position):
    ours = build_relative_position(length, length, buckets, max_position)
    t = torch.zeros(1, length, 1)
    theirs = hf_deberta.build_relative_position(t, t, bucket_size=buckets, max_position=max_position)[0]
    np.testing.assert_array_equal(ours, theirs.numpy())  # integer bucket ids: exact
    rel = np.arange(-3 * max_position, 3 * max_position)
    theirs = hf_deberta.make_log_bucket_position(torch.from_numpy(rel), buckets, max_position)
    np.testing.assert_array_equal(make_log_bucket_position(rel, buckets, max_position), theirs.long().numpy())


def test_bfloat16_compute_close_to_float32_reference():
    kwargs = CONFIGS["relative_shared"]
    model = _torch_model(kwargs)
    batch = _batch(kwargs)
    logits, hidden = _torch_outputs(model, batch)
    module = build(model.config, "sequence_classification", dtype=jnp.bfloat16)
    params = _params_from_state_dict(module, {k: v.numpy() for k, v in model.state_dict().items()})
    out = jax.jit(module.apply)({"params": params}, **batch)
    assert out["last_hidden_state"].dtype == jnp.bfloat16
    assert out["logits"].dtype == jnp.float32
    assert params["deberta"]["encoder"]["layer_0"]["attention"]["self"]["query_proj"]["kernel"].dtype == jnp.float32
    # bfloat16 keeps 8 significand bits (relative step 2^-8 ~ 4e-3); through two layers with unit-scale
    # LayerNorm outputs the error stays below ~0.1 (measured ~4e-2); a wrong computation is off by O(1).
    _assert_close(out, logits, hidden, batch["attention_mask"], atol=0.1)


def test_dense_fn_runs_every_dense_layer():
    for name, shared in (("relative_unshared", False), ("relative_shared", True)):
        kwargs = CONFIGS[name]
        calls: list[tuple[str, ...]] = []

        def recording(path, x, kernel, bias, calls=calls):
            calls.append(path)
            return deberta_v2.default_dense(path, x, kernel, bias)

        module = build(transformers.DebertaV2Config(**kwargs), "sequence_classification", dense_fn=recording)
        ids = jnp.ones((2, 12), jnp.int32)
        variables = jax.jit(module.init)(jax.random.key(0), ids)
        kernels = {p[:-1] for p, _ in convert.iter_paths(variables["params"]) if p[-1] == "kernel"}
        assert set(calls) == kernels
        layer0 = ("deberta", "encoder", "layer_0", "attention", "self")
        # shared keys: the relative embeddings also go through query_proj and key_proj
        assert calls.count((*layer0, "query_proj")) == (2 if shared else 1)
        assert calls.count((*layer0, "key_proj")) == (2 if shared else 1)
        assert ((*layer0, "pos_key_proj") in kernels) == (not shared)

        # the dense function's result is what the model uses: zeroing the classifier zeroes the logits
        def zero_head(path, x, kernel, bias):
            y = deberta_v2.default_dense(path, x, kernel, bias)
            return jnp.zeros_like(y) if path == ("classifier",) else y

        logits = jax.jit(module.clone(dense_fn=zero_head).apply)(variables, ids)["logits"]
        assert not np.any(np.asarray(jax.jit(module.apply)(variables, ids)["logits"]) == 0)
        np.testing.assert_array_equal(np.asarray(logits), 0.0)


def test_dropout_uses_the_dropout_rng():
    module = build(transformers.DebertaV2Config(**CONFIGS["relative_unshared"]), "sequence_classification")
    ids = jnp.ones((2, 12), jnp.int32)
    variables = jax.jit(module.init)(jax.random.key(0), ids)
    eval_logits = jax.jit(module.apply)(variables, ids)["logits"]
    train = jax.jit(lambda key: module.apply(variables, ids, deterministic=False, rngs={"dropout": key})["logits"])
    a, b, c = train(jax.random.key(1)), train(jax.random.key(1)), train(jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(a), np.asarray(eval_logits))
    with pytest.raises(Exception, match="dropout"):
        module.apply(variables, ids, deterministic=False)


def test_round_trip_through_load_pretrained(tmp_path):
    kwargs = CONFIGS["relative_unshared"]
    model = _torch_model(kwargs)
    batch = _batch(kwargs)
    logits, hidden = _torch_outputs(model, batch)
    model.save_pretrained(tmp_path / "cls")
    loaded = load_pretrained(tmp_path / "cls", task="sequence_classification", load_tokenizer=False)
    assert loaded.family is FAMILY and get_family("deberta-v2") is FAMILY
    assert loaded.report["initialized"] == []
    _assert_close(loaded.apply(loaded.params, **batch), logits, hidden, batch["attention_mask"], ATOL)

    # a base checkpoint (no "deberta." prefix) gets a fresh head; the encoder is the checkpoint's
    model.deberta.save_pretrained(tmp_path / "base")
    loaded = load_pretrained(tmp_path / "base", task="sequence_classification", num_labels=5, load_tokenizer=False)
    assert sorted(loaded.report["initialized"]) == [
        "classifier/bias",
        "classifier/kernel",
        "pooler/dense/bias",
        "pooler/dense/kernel",
    ]
    out = loaded.apply(loaded.params, **batch)
    assert out["logits"].shape == (3, 5)
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(out["last_hidden_state"])[real], hidden[real], rtol=0, atol=ATOL)


def test_v3_checkpoint_extras_are_ignored(tmp_path):
    """DeBERTa-v3 checkpoints carry an absolute position table although position_biased_input is off,
    and pre-training heads; transformers ignores both, so does the loader."""
    kwargs = CONFIGS["relative_shared"]
    model = _torch_model(kwargs)
    batch = _batch(kwargs)
    logits, hidden = _torch_outputs(model, batch)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    extras = {
        "deberta.embeddings.position_embeddings.weight": np.zeros((64, 48), np.float32),
        "lm_predictions.lm_head.bias": np.zeros((128,), np.float32),
        "mask_predictions.classifier.weight": np.zeros((1, 48), np.float32),
    }
    safetensors.numpy.save_file({**state, **extras}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    loaded = load_pretrained(tmp_path, task="sequence_classification", load_tokenizer=False)
    assert sorted(loaded.report["ignored"]) == sorted(extras)
    _assert_close(loaded.apply(loaded.params, **batch), logits, hidden, batch["attention_mask"], ATOL)


def _dict_config(**overrides) -> dict:
    return {"model_type": "deberta-v2", **_TINY, **_RELATIVE, **overrides}


@pytest.mark.parametrize(
    ("overrides", "task", "error", "message"),
    [
        ({}, "causal_lm", ValueError, "task 'causal_lm' is not supported by DeBERTa-v2; supported"),
        ({"pos_att_type": ["c2p", "p2p"]}, "base", ValueError, "Unknown pos_att_type entries ['p2p']"),
        ({"hidden_act": "gelu_10"}, "base", ValueError, "hidden_act='gelu_10' is not supported"),
        ({"num_attention_heads": 5}, "base", ValueError, "not a multiple of the number of attention heads"),
        ({"model_type": "bert"}, "base", ValueError, "Expected a DeBERTa-v2 config"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides, task, error, message):
    with pytest.raises(error, match=re.escape(message)):
        build(_dict_config(**overrides), task)


def test_even_conv_kernel_and_bad_mask_raise():
    ids = jnp.ones((2, 12), jnp.int32)
    module = build(_dict_config(conv_kernel_size=2), "base")
    with pytest.raises(NotImplementedError, match="use an odd conv_kernel_size"):
        module.init(jax.random.key(0), ids)
    module = build(_dict_config(), "base")
    with pytest.raises(ValueError, match=re.escape("attention_mask must be (batch, length)")):
        module.init(jax.random.key(0), ids, jnp.ones((2, 11), jnp.int32))
