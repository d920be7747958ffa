"""LLaMA (sora_jax.models.llama) against transformers' torch LlamaForCausalLM and friends.

Tiny random configs built offline (hidden 64, 2 layers, 4 query heads, 2 key/value heads, vocab 128),
converted to our parameter tree through the generic naming table of ``sora_jax.convert``.
"""

from __future__ import annotations

import copy
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sora_jax.convert import hf_key, hf_layout, iter_paths, set_path
from sora_jax.models import llama

# float32: both sides run the same float32 arithmetic in a different order; over 2 layers the
# differences stay at a few 1e-7 relative, so 1e-4 absolute has a wide margin yet catches any
# real mistake (a wrong rope frequency, mask or head grouping moves outputs by 1e-2 or more).
F32_ATOL = 1e-4

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # head_dim 16: wavelengths 6.3, 20, 63, ... -> kept (< 32/4), smoothed (8..32) and scaled (> 32)
    "original_max_position_embeddings": 32,
}
CASES = {
    "untied_default_rope_biases": dict(
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 2000.0},
    ),
    "tied_llama3_rope": dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
}


def hf_config(**overrides) -> transformers.LlamaConfig:
    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
        # weights of std 0.2 (not 0.02) give peaked attention, so masks and positions move outputs
        initializer_range=0.2,
    )
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


def torch_model(config: transformers.LlamaConfig, cls=transformers.LlamaForCausalLM) -> torch.nn.Module:
    """A random model in eval mode; norm scales and biases are randomised too (their defaults, ones and
    zeros, would hide a missing or misplaced scale/bias)."""
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def convert(module, state_dict: dict[str, torch.Tensor], input_ids) -> dict:
    """Our params from a torch state dict: our leaf paths (from ``jax.eval_shape`` of ``init``) ->
    ``state_dict[hf_key(path)]`` in our layout."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), input_ids)["params"]
    params: dict = {}
    for path, leaf in iter_paths(shapes):
        value = hf_layout(path, state_dict[hf_key(path)].detach().float().numpy())
        assert value.shape == leaf.shape, (path, value.shape, leaf.shape)
        set_path(params, path, jnp.asarray(value, leaf.dtype))
    return params


def padded_batch() -> tuple[np.ndarray, np.ndarray]:
    """``input_ids, attention_mask: (3, 12)``: a full row, a right-padded row, a left-padded row.

    Real tokens are in [1, 128); padding is token 0 (the pad_token_id of the classification test).
    """
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 128, size=(3, 12))
    mask = np.ones((3, 12), dtype=np.int64)
    mask[1, 8:] = 0
    mask[2, :5] = 0
    return np.where(mask == 1, ids, 0), mask


def torch_forward(model, ids, mask, position_ids=None) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=None if position_ids is None else torch.tensor(position_ids),
            output_hidden_states=True,
        )
    return out.logits.float().numpy(), out.hidden_states[-1].float().numpy()


def max_err(a, b, mask) -> float:
    """Max abs difference over the real (non-padding) positions ``mask: (batch, seq)``."""
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[mask.astype(bool)]))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    """(name, torch model, our module, our params) for one config of ``CASES``."""
    config = hf_config(**CASES[request.param])
    model = torch_model(config)
    module = llama.build(config, "causal_lm")
    ids, _ = padded_batch()
    return request.param, model, module, convert(module, model.state_dict(), jnp.asarray(ids))


def test_causal_lm_matches_transformers_float32(case):
    name, model, module, params = case
    ids, mask = padded_batch()
    ref_logits, ref_hidden = torch_forward(model, ids, mask)
    out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert out["logits"].shape == (3, 12, 128) and out["last_hidden_state"].shape == (3, 12, 64)
    assert max_err(out["logits"], ref_logits, mask) < F32_ATOL, name
    assert max_err(out["last_hidden_state"], ref_hidden, mask) < F32_ATOL, name
    # the check can fail: ignoring the padding mask changes the padded rows' real positions
    unmasked = module.apply({"params": params}, jnp.asarray(ids))
    assert max_err(unmasked["logits"], ref_logits, mask) > 100 * F32_ATOL


def test_causal_lm_position_ids_from_caller(case):
    """Position ids from the caller: counted from the first real token (generation style) and strided
    (RoPE sees only relative positions, so the stride is what makes a mishandled argument visible)."""
    _, model, module, params = case
    ids, mask = padded_batch()
    counted = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    default_pos = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    for position_ids in (counted, 3 * counted):
        ref_logits, _ = torch_forward(model, ids, mask, position_ids)
        out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(position_ids))
        assert max_err(out["logits"], ref_logits, mask) < F32_ATOL
    assert max_err(default_pos["logits"], ref_logits, mask) > 100 * F32_ATOL


def test_param_tree_is_the_checkpoint(case):
    """Every checkpoint tensor is one of our leaves (tied: lm_head.weight is the embedding)."""
    name, model, module, params = case
    ours = {hf_key(p) for p, _ in iter_paths(params)}
    hf = set(model.state_dict())
    tied = model.config.tie_word_embeddings
    assert hf - ours == ({"lm_head.weight"} if tied else set()), name
    assert ours <= hf
    assert ("lm_head" in params) is not tied
    buffers = [n for n, _ in model.named_buffers()]
    assert buffers and all(any(re.search(r, n) for r in llama.FAMILY.ignore_hf_keys) for n in buffers)


def test_bfloat16_close_to_float32_reference(case):
    """bfloat16 compute (float32 params, and bfloat16 params) against the float32 torch model.

    bfloat16 keeps 8 significant bits (relative rounding 2^-9 per op); through 2 layers of these
    std-0.2 weights transformers' own bfloat16 run is off its float32 run by 3-6 % of the output
    scale, and ours by about as much (measured: 0.8x-1.1x). The bound is 2x transformers' bfloat16
    error plus 1 % of the scale; a real mistake moves outputs by the order of the scale itself.
    """
    _, model, module, params = case
    ids, mask = padded_batch()
    ref_logits, ref_hidden = torch_forward(model, ids, mask)
    torch_logits, torch_hidden = torch_forward(copy.deepcopy(model).to(torch.bfloat16), ids, mask)
    logits_bound = 2 * max_err(torch_logits, ref_logits, mask) + 1e-2 * np.abs(ref_logits).max()
    hidden_bound = 2 * max_err(torch_hidden, ref_hidden, mask) + 1e-2 * np.abs(ref_hidden).max()
    for param_dtype in (jnp.float32, jnp.bfloat16):
        m = llama.build(model.config, "causal_lm", dtype=jnp.bfloat16, param_dtype=param_dtype)
        p = jax.tree.map(lambda x, dt=param_dtype: x.astype(dt), params)
        out = m.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask))
        assert out["last_hidden_state"].dtype == jnp.bfloat16 and out["logits"].dtype == jnp.float32
        assert max_err(out["logits"], ref_logits, mask) < logits_bound, param_dtype
        assert max_err(out["last_hidden_state"], ref_hidden, mask) < hidden_bound, param_dtype


def test_dense_fn_is_used_for_every_linear(case):
    """The top module's dense_fn runs every dense layer with its own kernel: doubling q_proj's kernel
    in the dense_fn equals doubling it in the params."""
    name, _, module, params = case
    ids, mask = padded_batch()
    seen: list[tuple[str, ...]] = []

    def doubling_q(path, x, kernel, bias):
        seen.append(path)
        if path[-1] == "q_proj":
            kernel = 2 * kernel
        return llama.default_dense(path, x, kernel, bias)

    m = llama.build(module.config, "causal_lm", dense_fn=doubling_q)
    out = m.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    expected = {("model", f"layers_{i}", "self_attn" if n[0] in "qkvo" else "mlp", n) for i in range(2) for n in names}
    if not module.config.tie_word_embeddings:
        expected.add(("lm_head",))
    assert set(seen) == expected, name
    doubled = jax.tree_util.tree_map_with_path(
        lambda kp, x: 2 * x if "['q_proj']['kernel']" in jax.tree_util.keystr(kp) else x, params
    )
    ref = module.apply({"params": doubled}, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-5)
    base = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert max_err(base["logits"], out["logits"], mask) > 100 * F32_ATOL


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}, LLAMA3_ROPE])
def test_rope_inv_freq_matches_transformers(rope):
    config = hf_config(rope_parameters=rope) if rope else hf_config()
    ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config).inv_freq.numpy()
    ours = llama.rope_inv_freq(llama.LlamaConfig.from_hf(config))
    # same float32 formula: equal to float32 rounding (relative 1e-6)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)
    if rope is LLAMA3_ROPE:
        plain = llama.rope_inv_freq(llama.LlamaConfig.from_hf(hf_config()))
        ratio = plain / ours
        # the test config reaches all three regimes: kept, interpolated and divided by the factor
        assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 8.0).any()
        assert ((ratio > 1.01) & (ratio < 7.99)).any()


def test_base_task_matches_llama_model():
    config = hf_config(**CASES["tied_llama3_rope"])
    model = torch_model(config)
    module = llama.build(config, "base")
    ids, mask = padded_batch()
    params = convert(module, model.state_dict(), jnp.asarray(ids))
    assert set(params) == {"model"}
    out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert set(out) == {"last_hidden_state"}
    with torch.no_grad():
        ref = model.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    assert max_err(out["last_hidden_state"], ref.numpy(), mask) < F32_ATOL


def test_sequence_classification_matches_transformers():
    config = hf_config(pad_token_id=0, num_labels=3)
    model = torch_model(config, transformers.LlamaForSequenceClassification)
    module = llama.build(config, "sequence_classification")
    ids, mask = padded_batch()
    params = convert(module, model.state_dict(), jnp.asarray(ids))
    assert params["score"]["kernel"].shape == (64, 3) and "bias" not in params["score"]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert out["logits"].shape == (3, 3)
    np.testing.assert_allclose(out["logits"], ref, atol=F32_ATOL, rtol=0)
    np.testing.assert_array_equal(llama.last_non_pad_index(jnp.asarray(ids), 0), [11, 7, 11])


def test_config_from_json_dict_and_legacy_rope_scaling(tmp_path):
    config = hf_config(**CASES["tied_llama3_rope"])
    config.save_pretrained(tmp_path)
    from_json = llama.LlamaConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert from_json == llama.LlamaConfig.from_hf(config)
    assert (from_json.rope_type, from_json.rope_factor, from_json.original_max_position_embeddings) == (
        "llama3",
        8.0,
        32,
    )
    legacy = json.loads((tmp_path / "config.json").read_text())
    rope = legacy.pop("rope_parameters")
    legacy["rope_theta"] = rope.pop("rope_theta")
    legacy["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    assert llama.LlamaConfig.from_hf(legacy) == from_json
    assert from_json.head_dim == 16 and from_json.num_key_value_heads == 2 and from_json.tie_word_embeddings


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match=r"Unsupported rope type 'yarn'.*rope_parameters"):
        llama.build(hf_config(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}))
    with pytest.raises(ValueError, match="Unknown task 'token_classification'.*choose one of"):
        llama.build(hf_config(), "token_classification")
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
        llama.LlamaConfig.from_hf({**hf_config().to_dict(), "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="Unsupported hidden_act 'mish'"):
        llama.build(hf_config(hidden_act="mish"))
    ids = jnp.ones((2, 6), jnp.int32)
    module = llama.build(hf_config(), "sequence_classification")
    with pytest.raises(ValueError, match="needs config.pad_token_id.*set pad_token_id"):
        jax.eval_shape(module.init, jax.random.key(0), ids)
    module = llama.build(hf_config(), "causal_lm")
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 5\) does not match input_ids shape \(2, 6\)"):
        jax.eval_shape(module.init, jax.random.key(0), ids, jnp.ones((2, 5)))


def test_save_pretrained_then_load_pretrained(case, tmp_path):
    """transformers' save_pretrained -> sora_jax.load_pretrained gives the same model (tied: the
    checkpoint has no lm_head.weight, our model needs none)."""
    from sora_jax import load_pretrained

    name, model, _, params = case
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path, task="causal_lm")
    assert loaded.report["initialized"] == [], name
    assert jax.tree.map(np.shape, loaded.params) == jax.tree.map(np.shape, params)
    ids, mask = padded_batch()
    ref_logits, ref_hidden = torch_forward(model, ids, mask)
    out = loaded.apply(loaded.params, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert max_err(out["logits"], ref_logits, mask) < F32_ATOL
    assert max_err(out["last_hidden_state"], ref_hidden, mask) < F32_ATOL
    # a classifier from the causal-LM checkpoint: the decoder loads, the score head is new
    cls = load_pretrained(tmp_path, task="sequence_classification", num_labels=3)
    assert cls.report["initialized"] == ["score/kernel"]
    np.testing.assert_array_equal(cls.params["model"]["norm"]["scale"], model.model.norm.weight.detach().numpy())


def test_attention_dropout_in_training():
    """``attention_dropout`` drops attention probabilities when not deterministic: a key decides the mask
    (same key, same logits; another key, others), the mask keeps causality (a changed last token leaves
    the other positions as they were), and deterministic runs ignore it."""
    config = hf_config(attention_dropout=0.5)
    module = llama.build(config, "causal_lm")
    ids, mask = padded_batch()
    params = module.init(jax.random.key(0), jnp.asarray(ids))["params"]

    def run(ids, key=None):
        kw = {} if key is None else {"deterministic": False, "rngs": {"dropout": key}}
        return np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), **kw)["logits"])

    k1, k2 = jax.random.key(1), jax.random.key(2)
    a = run(ids, k1)
    np.testing.assert_array_equal(a, run(ids, k1))
    assert np.abs(a - run(ids, k2)).max() > 1e-2
    assert np.abs(a - run(ids)).max() > 1e-2
    changed = ids.copy()
    changed[0, -1] = ids[0, -1] % 127 + 1
    np.testing.assert_allclose(run(changed, k1)[0, :-1], a[0, :-1], rtol=1e-6, atol=1e-6)
