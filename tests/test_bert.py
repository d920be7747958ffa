"""The Flax BERT/RoBERTa models against ``transformers`` (torch, float32) and the model registry.

Tolerance: 1e-4 max abs in float32. Both frameworks compute the same float32 graph; the only
differences are summation orders (XLA vs ATen), which give ~1e-6 on these tiny models, so 1e-4
leaves a margin while any wrong weight, mask, position id or activation shows up at >= 1e-2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_fixtures import batch, save, tiny_config, torch_forward, torch_model

from sora_jax import convert
from sora_jax.hub import load_pretrained
from sora_jax.models import get_family
from sora_jax.models.bert import BERT_FAMILY, ROBERTA_FAMILY, build, roberta_position_ids

TOL = 1e-4


def _max_err(a, b, mask=None) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d[mask.astype(bool)].max() if mask is not None else d.max())


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_param_names_are_the_hf_state_dict(kind):
    """Our parameter paths map 1:1 onto the torch state dict names and shapes (both tasks)."""
    for task in ("sequence_classification", "base"):
        tm = torch_model(kind, task)
        module = build(tm.config, task)
        shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
        ours = {
            convert.hf_key(p): convert.hf_layout(p, np.empty(v.shape, np.int8)).shape
            for p, v in convert.iter_paths(shapes)
        }
        prefix = f"{kind}."
        ref = {
            (k if task != "base" else prefix + k): tuple(v.shape)
            for k, v in tm.state_dict().items()
            if not k.endswith(("position_ids", "token_type_ids"))
        }
        assert ours == ref


def test_paths_follow_naming_convention():
    module = build(tiny_config("bert"), "sequence_classification")
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    paths = {"/".join(p) for p, _ in convert.iter_paths(shapes)}
    for p in (
        "bert/encoder/layer_0/attention/self/query/kernel",
        "bert/encoder/layer_1/output/dense/kernel",
        "bert/embeddings/LayerNorm/scale",
        "bert/embeddings/word_embeddings/embedding",
        "bert/pooler/dense/kernel",
        "classifier/kernel",
    ):
        assert p in paths
    module = build(tiny_config("roberta"), "sequence_classification")
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    paths = {"/".join(p) for p, _ in convert.iter_paths(shapes)}
    assert {"classifier/dense/kernel", "classifier/out_proj/kernel"} <= paths
    assert not any(p.startswith("roberta/pooler") for p in paths)  # RobertaForSequenceClassification has none


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta"])
def test_classification_matches_torch_with_padding(kind, tmp_path):
    tm = torch_model(kind)
    model = load_pretrained(save(tm, tmp_path / kind))
    b = batch(tm.config)
    ref = torch_forward(tm, b)
    out = model.apply(model.params, **b)
    assert out["logits"].shape == (3, 3) and out["logits"].dtype == jnp.float32
    assert _max_err(out["logits"], ref.logits) < TOL
    # hidden states only where tokens are real: padded positions are meaningless in both frameworks
    assert _max_err(out["last_hidden_state"], ref.hidden_states[-1], b["attention_mask"]) < TOL


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_base_model_matches_torch(kind, tmp_path):
    tm = torch_model(kind, "base")
    model = load_pretrained(save(tm, tmp_path / kind), task="base")
    b = batch(tm.config, seed=1)
    ref = torch_forward(tm, b)
    out = model.apply(model.params, **b)
    assert set(out) == {"last_hidden_state", "pooler_output"}
    assert _max_err(out["last_hidden_state"], ref.last_hidden_state, b["attention_mask"]) < TOL
    assert _max_err(out["pooler_output"], ref.pooler_output) < TOL


def test_regression_head_and_jit(tmp_path):
    tm = torch_model("bert", num_labels=1)
    model = load_pretrained(save(tm, tmp_path / "m"))
    b = batch(tm.config, seed=2)
    out = jax.jit(lambda p, bb: model.apply(p, **bb))(model.params, b)
    assert out["logits"].shape == (3, 1)
    assert _max_err(out["logits"], torch_forward(tm, b).logits) < TOL


def test_roberta_position_ids_match_transformers():
    import torch
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    ids = np.array([[0, 5, 6, 1, 1], [0, 1, 7, 8, 1]])
    ref = RobertaEmbeddings.create_position_ids_from_input_ids(torch.tensor(ids), padding_idx=1)
    np.testing.assert_array_equal(np.asarray(roberta_position_ids(jnp.asarray(ids), 1)), ref.numpy())


def test_bfloat16_compute_is_close_to_float32_torch(tmp_path):
    tm = torch_model("bert")
    model = load_pretrained(save(tm, tmp_path / "m"), dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(model.params))  # params stay float32
    b = batch(tm.config)
    out = model.apply(model.params, **b)
    assert out["last_hidden_state"].dtype == jnp.bfloat16
    # bf16 has an 8-bit mantissa (relative rounding 2^-8 ~ 4e-3 per op); after two layers the
    # error on O(1) logits stays below 0.1, while a broken bf16 path (mask, softmax) is off by > 0.3
    err = _max_err(out["logits"], torch_forward(tm, b).logits)
    assert 0 < err < 0.1
    model16 = load_pretrained(tmp_path / "m", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(model16.params))
    assert _max_err(model16.apply(model16.params, **b)["logits"], torch_forward(tm, b).logits) < 0.1


def test_dropout_flag_and_rng(tmp_path):
    tm = torch_model("bert", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = load_pretrained(save(tm, tmp_path / "m"))
    b = batch(tm.config)
    det = model.apply(model.params, **b)["logits"]
    k1, k2 = jax.random.split(jax.random.key(0))
    d1 = model.apply(model.params, deterministic=False, rngs={"dropout": k1}, **b)["logits"]
    d1b = model.apply(model.params, deterministic=False, rngs={"dropout": k1}, **b)["logits"]
    d2 = model.apply(model.params, deterministic=False, rngs={"dropout": k2}, **b)["logits"]
    np.testing.assert_array_equal(d1, d1b)
    assert _max_err(d1, det) > 1e-3 and _max_err(d1, d2) > 1e-3
    with pytest.raises(Exception, match="dropout"):
        model.apply(model.params, deterministic=False, **b)


def test_explicit_attention_path_matches_torch(tmp_path):
    """The dropout-capable attention (used when not deterministic) is the same function: with a
    dropout rate so small that nothing is dropped, it must reproduce torch's logits."""
    tm = torch_model("roberta", hidden_dropout_prob=0.0, attention_probs_dropout_prob=1e-12)
    model = load_pretrained(save(tm, tmp_path / "m"))
    b = batch(tm.config)
    out = model.apply(model.params, deterministic=False, rngs={"dropout": jax.random.key(0)}, **b)
    assert _max_err(out["logits"], torch_forward(tm, b).logits) < TOL


def test_dense_fn_reaches_every_linear(tmp_path):
    tm = torch_model("roberta")
    model = load_pretrained(save(tm, tmp_path / "m"))
    seen = []

    def dense_fn(path, x, kernel, bias):
        seen.append("/".join(path))
        return 2.0 * (x @ kernel + bias)  # visibly different from the default

    b = batch(tm.config)
    out = model.apply(model.params, dense_fn=dense_fn, **b)
    kernels = {"/".join(p[:-1]) for p, _ in convert.iter_paths(model.params) if p[-1] == "kernel"}
    assert set(seen) == kernels and len(kernels) == 2 * 6 + 2
    assert _max_err(out["logits"], model.apply(model.params, **b)["logits"]) > 1e-2


def test_dense_fn_contract_with_and_without_input_act(tmp_path):
    """The FFN's output layer computes ``gelu(pre) W + b``. A dense function of the plain four-argument
    contract is handed ``gelu(pre)`` (the model applies the activation for it); one that takes
    ``input_act`` (here by ``**kwargs``) is handed the pre-activation and the activation's name. Both,
    written as the plain layer, reproduce the model (float32, identical operations: 1e-6)."""
    from sora_jax.models.common import ACTIVATIONS

    tm = torch_model("bert")
    model = load_pretrained(save(tm, tmp_path / "m"))
    acts = []

    def plain(path, x, kernel, bias):
        return x @ kernel + bias

    def keyword(path, x, kernel, bias, **kw):
        acts.append(kw.get("input_act"))
        x = x if kw.get("input_act") is None else ACTIVATIONS[kw["input_act"]](x)
        return x @ kernel + bias

    b = batch(tm.config)
    want = model.apply(model.params, **b)["logits"]
    for fn in (plain, keyword):
        assert _max_err(model.apply(model.params, dense_fn=fn, **b)["logits"], want) < 1e-6, fn.__name__
    L = tm.config.num_hidden_layers
    assert acts.count(tm.config.hidden_act) == L and acts.count(None) == len(acts) - L


def test_unsupported_config_options():
    with pytest.raises(ValueError, match="position_embedding_type='relative_key' is not supported"):
        build(tiny_config("bert", position_embedding_type="relative_key"))
    with pytest.raises(ValueError, match="hidden_act='mish' is not supported"):
        build(tiny_config("bert", hidden_act="mish"))
    with pytest.raises(ValueError, match="task 'causal_lm' is not supported"):
        build(tiny_config("bert"), "causal_lm")


def test_registry(monkeypatch):
    import sora_jax.models as models

    assert get_family("bert") is BERT_FAMILY
    assert get_family("roberta") is ROBERTA_FAMILY
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'; supported: bert, roberta"):
        get_family("gpt2")
    monkeypatch.setitem(models._MODULES, "newarch", "no_such_module")
    with pytest.raises(ValueError, match=r"unsupported model_type 'newarch': its module .*no_such_module"):
        get_family("newarch")
