"""Gemma, Gemma 2 and Gemma 3 text (sora_jax.models.gemma) against transformers' torch models.

Tiny random configs built offline (hidden 64, 3 layers, 4 query heads, 2 key/value heads, head_dim 24, vocab
128); Gemma 2/3 with a sliding window of 5 shorter than the 12-token batch, so sliding layers differ from
full ones. Helpers (random norm scales, padded batch, conversion through the naming table) are
test_llama's.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_llama import convert, max_err, padded_batch, torch_forward, torch_model

from sora_jax.convert import hf_key, iter_paths
from sora_jax.models import gemma, get_family

# float32, the same arithmetic in another order: a few 1e-7 relative over 3 layers (as test_llama); a
# wrong norm offset, embedding scale, window or rope base moves logits by 1e-2 or more.
F32_ATOL = 1e-4
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    max_position_embeddings=64,
    attn_implementation="eager",
    initializer_range=0.2,
    pad_token_id=0,
)
SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
CASES = {
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(rope_theta=500.0)),
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(
            sliding_window=5,
            layer_types=SLIDING,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3_text": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(
            sliding_window=5,
            layer_types=SLIDING,
            query_pre_attn_scalar=20,
            final_logit_softcapping=30.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        ),
    ),
}


def hf_config(kind: str, **overrides):
    cls, _, extra = CASES[kind]
    return cls(**{**COMMON, **extra, **overrides})


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    """(kind, torch model, our module, our params)."""
    kind = request.param
    model = torch_model(hf_config(kind), CASES[kind][1])
    module = gemma.build(model.config, "causal_lm")
    ids, _ = padded_batch()
    return kind, model, module, convert(module, model.state_dict(), jnp.asarray(ids))


def test_causal_lm_matches_transformers_float32(case):
    kind, model, module, params = case
    ids, mask = padded_batch()
    ref_logits, ref_hidden = torch_forward(model, ids, mask)
    out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert out["logits"].shape == (3, 12, 128)
    assert max_err(out["logits"], ref_logits, mask) < F32_ATOL, kind
    assert max_err(out["last_hidden_state"], ref_hidden, mask) < F32_ATOL, kind
    # caller's position ids (counted from the first real token, as generation passes them)
    counted = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    ref_counted, _ = torch_forward(model, ids, mask, counted)
    out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(counted))
    assert max_err(out["logits"], ref_counted, mask) < F32_ATOL, kind


def test_every_feature_moves_the_output(case):
    """The test above can fail: each Gemma-specific feature, switched off, changes the logits."""
    import dataclasses

    kind, model, module, params = case
    ids, mask = padded_batch()
    ref_logits, _ = torch_forward(model, ids, mask)
    c = module.config
    changes = {"local_rope_theta": None, "rope_theta": 10000.0}
    if c.sliding_window:
        changes["sliding_window"] = 64
    if c.attn_logit_softcapping:
        changes["attn_logit_softcapping"] = None
    if c.final_logit_softcapping:
        changes["final_logit_softcapping"] = None
    if kind != "gemma":
        changes["query_pre_attn_scalar"] = float(c.head_dim)
    for field, value in changes.items():
        if getattr(c, field) == value:
            continue
        other = gemma.build(dataclasses.replace(c, **{field: value}), "causal_lm")
        out = other.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
        assert max_err(out["logits"], ref_logits, mask) > 10 * F32_ATOL, (kind, field)


def test_param_tree_is_the_checkpoint(case):
    kind, model, module, params = case
    ours = {hf_key(p) for p, _ in iter_paths(params)}
    hf = set(model.state_dict())
    assert hf - ours == {"lm_head.weight"}, kind  # tied
    assert ours <= hf
    if kind == "gemma3_text":
        assert params["model"]["layers_0"]["self_attn"]["q_norm"]["scale"].shape == (24,)
    buffers = [n for n, _ in model.named_buffers()]
    import re

    assert all(any(re.search(r, n) for r in gemma.FAMILY.ignore_hf_keys) for n in buffers), buffers


def test_save_pretrained_then_load_pretrained(tmp_path):
    """transformers' save_pretrained -> load_pretrained picks the Gemma family and loads every weight."""
    from sora_jax import load_pretrained

    model = torch_model(hf_config("gemma3_text"), transformers.Gemma3ForCausalLM)
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path, task="causal_lm")
    assert loaded.family is get_family("gemma3_text") and loaded.report["initialized"] == []
    ids, mask = padded_batch()
    ref_logits, _ = torch_forward(model, ids, mask)
    out = loaded.apply(loaded.params, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert max_err(out["logits"], ref_logits, mask) < F32_ATOL


def test_sequence_classification_matches_transformers():
    config = hf_config("gemma3_text", num_labels=3)
    model = torch_model(config, transformers.Gemma3TextForSequenceClassification)
    module = gemma.build(config, "sequence_classification")
    ids, mask = padded_batch()
    params = convert(module, model.state_dict(), jnp.asarray(ids))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(out["logits"], ref, atol=F32_ATOL, rtol=0)


def test_cache_prefill_and_steps_equal_the_full_forward(case):
    """Logits through the key/value cache (a prefill, then one token at a time, left padding) equal the
    full forward's, sliding layers included (the sequence is longer than the window)."""
    from sora_jax.models.llama import init_cache

    kind, _, module, params = case
    ids, mask = padded_batch()
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # full and left-padded rows
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    full = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions))["logits"]
    cache = init_cache(module.config, 2, 12)
    out = module.apply({"params": params}, jnp.asarray(ids[:, :7]), jnp.asarray(mask), jnp.asarray(positions[:, :7]),
                       cache=cache, cache_index=0)
    steps = [out["logits"]]
    cache = out["cache"]
    for i in range(7, 12):
        out = module.apply({"params": params}, jnp.asarray(ids[:, i : i + 1]), jnp.asarray(mask),
                           jnp.asarray(positions[:, i : i + 1]), cache=cache, cache_index=i)
        cache = out["cache"]
        steps.append(out["logits"])
    assert max_err(jnp.concatenate(steps, axis=1), full, mask) < F32_ATOL, kind


def test_bad_config_raises_clear_errors():
    with pytest.raises(ValueError, match="layer_types must name one of"):
        gemma.build({**hf_config("gemma2").to_dict(), "layer_types": ["full_attention", "chunked_attention"] * 2})
    with pytest.raises(ValueError, match="multimodal Gemma 3; load its text model"):
        gemma.GemmaConfig.from_hf({"model_type": "gemma3"})
    with pytest.raises(ValueError, match="Unknown task 'token_classification'"):
        gemma.build(hf_config("gemma"), "token_classification")


@pytest.mark.parametrize("method", ["lora", "sora"])
def test_activation_path_equals_weight_path(case, method):
    """Adapters on every projection run on activations (``adapted_dense``: the pre-norms handed to q, k, v,
    gate and up as ``input_norm``, the gated product to down as ``gate``; Gemma 2/3's sandwich norms)
    against ``apply_adapter`` then the frozen model: logits and every adapter gradient. Float32, the same
    arithmetic in other orders through 3 layers of weights with std 0.2: logits to ``F32_ATOL``; each
    gradient leaf to 2e-4 of its largest entry (the paths differ by up to 6e-5 of it, as much when the
    layers were handed their inputs formed; a wrong norm or gate moves gradients by 1e-2 or more)."""
    import jax

    import sora_jax

    kind, _, module, params = case
    ids, mask = padded_batch()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = sora_jax.AdapterConfig(method=method, r=4, lora_alpha=8, rotation_rank=2, target_modules=targets)
    adapter = sora_jax.init_adapter(jax.random.key(0), params, cfg)
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapter = treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)])
    proj = jnp.asarray(np.random.default_rng(2).normal(size=(*ids.shape, COMMON["vocab_size"])), jnp.float32)
    weights = jnp.asarray(mask)[..., None] * proj

    def activation(a):
        logits = module.clone(dense_fn=sora_jax.adapted_dense(a)).apply({"params": params}, jnp.asarray(ids),
                                                                       jnp.asarray(mask))["logits"]  # fmt: skip
        return jnp.sum(logits * weights), logits

    def weight(a):
        logits = module.apply({"params": sora_jax.apply_adapter(params, a)}, jnp.asarray(ids), jnp.asarray(mask))["logits"]
        return jnp.sum(logits * weights), logits

    (_, got_logits), got = jax.jit(jax.value_and_grad(activation, has_aux=True))(adapter)
    (_, want_logits), want = jax.value_and_grad(weight, has_aux=True)(adapter)
    assert max_err(got_logits, np.asarray(want_logits), mask) < F32_ATOL, kind
    for path, lv in want.layers.items():
        for name, w in lv.items():
            g, w = np.asarray(got.layers[path][name]), np.asarray(w)
            np.testing.assert_allclose(g, w, rtol=0, atol=2e-4 * np.abs(w).max(), err_msg=f"{kind} {path} {name}")
