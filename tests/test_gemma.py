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
