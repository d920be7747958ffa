"""Greedy decoding (sora_jax.generate) against transformers' ``generate`` on the same tiny models.

Tiny random LLaMA and Gemma 3 models (test_llama / test_gemma configs; weights of std 0.2 give peaked
next-token distributions, so float32 reordering cannot flip an arg-max), three left-padded prompts of
different lengths. Token ids are compared exactly: any error in the cache, the positions of padded rows,
the sliding window or the stopping rule changes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_gemma
import test_llama
import torch
import transformers
from test_llama import convert, torch_model

import sora_jax
from sora_jax.convert import params_to_hf
from sora_jax.generate import cut_at_stop, greedy_generate
from sora_jax.models import gemma, llama

NEW = 10


def prompts() -> tuple[np.ndarray, np.ndarray]:
    """``(3, 9)`` left-padded prompts of 9, 6 and 3 tokens (padding: token 0)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 128, size=(3, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return np.where(mask == 1, ids, 0), mask


def hf_generate(model, ids, mask, eos=None) -> np.ndarray:
    """transformers' greedy continuation, padded with 0 to ``NEW`` tokens."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW, do_sample=False,
            eos_token_id=eos, pad_token_id=0,
        )[:, ids.shape[1] :].numpy()
    return np.pad(out, ((0, 0), (0, NEW - out.shape[1])))


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def case(request):
    if request.param == "llama":
        model = torch_model(test_llama.hf_config(**test_llama.CASES["tied_llama3_rope"]))
        module = llama.build(model.config, "causal_lm")
    else:
        model = test_gemma.torch_model(test_gemma.hf_config("gemma3_text"), transformers.Gemma3ForCausalLM)
        module = gemma.build(model.config, "causal_lm")
    model.generation_config.cache_implementation = None
    ids, _ = prompts()
    return request.param, model, module, convert(module, model.state_dict(), jnp.asarray(ids))


def test_greedy_tokens_equal_transformers(case):
    kind, model, module, params = case
    ids, mask = prompts()
    expected = hf_generate(model, ids, mask)
    got = greedy_generate(module, params, ids, mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(got, expected, err_msg=kind)
    assert len({tuple(r) for r in got}) == 3  # the rows differ: the test sees each row's positions
    # with an end-of-sequence token: row 0's fourth token; rows stop after it and are padded
    eos = int(expected[0, 3])
    expected_eos = hf_generate(model, ids, mask, eos=eos)
    got_eos = greedy_generate(module, params, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(got_eos, expected_eos, err_msg=kind)
    first = int(np.argmax(got_eos[0] == eos))
    assert first <= 3 and got_eos[0, first] == eos and (got_eos[0, first + 1 :] == 0).all()


def test_logits_to_keep_is_the_last_positions(case):
    """``logits_to_keep=k``: the last ``k`` positions' logits (what a prefill needs), equal to the full
    logits' slice; Gemma 3's final soft-capping applies to them the same way."""
    kind, model, module, params = case
    ids, mask = prompts()
    full = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))["logits"]
    for k in (1, 4):
        got = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), logits_to_keep=k)["logits"]
        assert got.shape == (3, k, full.shape[-1])
        np.testing.assert_allclose(np.asarray(got), np.asarray(full[:, -k:]), rtol=1e-5, atol=1e-5, err_msg=kind)


@pytest.mark.parametrize("method", ["sora", "dora"])
def test_adapter_unmerged_and_merged_equal_transformers_on_merged_weights(case, method):
    """A SORA or DoRA adapter (DoRA's norms computed once before decoding) with non-zero factors: on
    activations (adapter=) and merged into the weights, the tokens equal transformers' generate on the
    merged weights (exported through the naming table)."""
    kind, model, module, params = case
    config = sora_jax.AdapterConfig(method=method, r=4, lora_alpha=8, rotation_rank=1,
                                    target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    adapter = sora_jax.init_adapter(jax.random.key(0), params, config)
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    adapter = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), adapter)
    merged = sora_jax.merge(params, adapter)
    ids, mask = prompts()
    ref = type(model)(model.config).eval()
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params_to_hf(merged).items()}, strict=False)
    ref.tie_weights()
    ref.generation_config.cache_implementation = None
    expected = hf_generate(ref, ids, mask)
    assert (expected != hf_generate(model, ids, mask)).any()  # the adapter changes the output
    np.testing.assert_array_equal(greedy_generate(module, merged, ids, mask, max_new_tokens=NEW), expected)
    np.testing.assert_array_equal(
        greedy_generate(module, params, ids, mask, max_new_tokens=NEW, adapter=adapter), expected,
        err_msg=f"{kind} {method}",
    )


def test_stop_strings_and_bad_input():
    assert cut_at_stop("the answer is true\n### Instruction", ["###", "\n\n"]) == "the answer is true\n"
    assert cut_at_stop("no stop here", ["###"]) == "no stop here"
    module = llama.build(test_llama.hf_config(), "causal_lm")
    params = module.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    ids, mask = prompts()
    with pytest.raises(ValueError, match="must be left-padded.*padding_side='left'"):
        greedy_generate(module, params, ids, mask[:, ::-1], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        greedy_generate(module, params, ids, mask, max_new_tokens=0)
