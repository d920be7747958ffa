"""sora_jax.harness (the ``sora-jax`` model of lm-evaluation-harness) against transformers on the same weights.

A tiny random LLaMA with a byte-level BPE tokenizer (test_reasoning's model directory; weights re-drawn with
std 0.2 as in test_llama, so next-token distributions are peaked and float32 reordering cannot flip an
arg-max) is saved with ``save_pretrained`` and loaded through ``sora_jax.load_pretrained``. The reference is
lm_eval's own ``HFLM`` over ``transformers``' torch model loaded from the same directory: the same
context/continuation split, rolling windows and stop handling, computed independently in PyTorch.
Log-probabilities agree to 1e-4 absolute (float32 sums of up to ~10 token log-probabilities, totals of -12 to
-66 over a 300-token vocabulary; the observed gap is 8e-6).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import lm_eval  # the optional extra sora-jax[eval], part of the test extra
import numpy as np
import pytest
import test_llama
import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from test_reasoning import tiny_model_dir

import sora_jax
from sora_jax import lm
from sora_jax.harness import SoraJaxLM

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4

CONTEXTS = [
    "Is 4 even?\nAnswer format: true/false\n\n### Response:\n",
    "the correct answer is",
    "Below is an instruction that describes a task.",
]
CONTINUATIONS = [" true", " false", " answer1", " The answer is 42.", "true false"]


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``(model_dir, loaded PretrainedModel, torch model, tokenizer)``."""
    path = tiny_model_dir(tmp_path_factory.mktemp("harness") / "model")
    config = transformers.AutoConfig.from_pretrained(path)
    config.initializer_range = 0.2
    test_llama.torch_model(config).save_pretrained(path)  # peaked weights, norms randomised
    model = sora_jax.load_pretrained(path, task="causal_lm")
    ref = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return path, model, ref, tok


def _hflm(ref, tok, **kw) -> HFLM:
    return HFLM(pretrained=ref, tokenizer=tok, batch_size=3, **kw)


def _requests() -> list[tuple[str, str]]:
    """Every context with every continuation, and an empty context."""
    return [(c, x) for c in CONTEXTS for x in CONTINUATIONS] + [("", "the correct answer is true")]


def _greedy_token_requests(ref, tok) -> list[tuple[None, list[int], list[int]]]:
    """Token-level requests: each context with torch's 3 greedy tokens after it (is_greedy True), and with
    the last of them replaced (False)."""
    out = []
    for c in CONTEXTS:
        ids = torch.tensor([tok.encode(c)])
        with torch.no_grad():
            new = ref.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
        new = new.tolist()
        out += [(None, ids[0].tolist(), new), (None, ids[0].tolist(), new[:2] + [(new[2] + 1) % len(tok)])]
    return out


# -- token_logprobs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_token_logprobs_equal_float64_log_softmax(chunk, softcap):
    """Chunks that overlap (7, 64 over 100 columns) and one chunk; a planted tie between columns in two
    chunks: the arg-max is the first, as ``np.argmax``."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(12, 16)).astype(np.float32)
    w = rng.normal(size=(16, 100)).astype(np.float32)
    w[:, 90] = w[:, 3]  # columns 3 and 90 tie on every row
    labels = rng.integers(0, 100, 12)
    logits = h.astype(np.float64) @ w.astype(np.float64)
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    top = np.argmax(logits, axis=1)
    labels[:4] = top[:4]  # some labels are the arg-max
    labels[4] = 90
    h[4] = w[:, 3] * 10  # row 4: column 3 (= 90) is the maximum; 90 is not the first one
    logits[4] = h[4].astype(np.float64) @ w.astype(np.float64)
    if softcap is not None:
        logits[4] = softcap * np.tanh(logits[4] / softcap)
    expected = logits[np.arange(12), labels] - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) - logits.max(1)
    logp, greedy = lm.token_logprobs(jnp.asarray(h), jnp.asarray(w), jnp.asarray(labels), chunk, softcap)
    np.testing.assert_allclose(np.asarray(logp), expected, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(greedy), np.argmax(logits, axis=1) == labels)
    assert np.asarray(greedy)[:4].all() and not np.asarray(greedy)[4]


# -- (a) loglikelihood -------------------------------------------------------------------------------------
def test_loglikelihood_equals_hflm_on_torch(setup):
    path, model, ref, tok = setup
    pairs = _requests()
    ours = SoraJaxLM(model, batch_size=4).loglikelihood(_instances("loglikelihood", pairs))
    theirs = _hflm(ref, tok).loglikelihood(_instances("loglikelihood", pairs))
    np.testing.assert_allclose([x for x, _ in ours], [x for x, _ in theirs], atol=TOL, rtol=0)
    assert [g for _, g in ours] == [g for _, g in theirs]
    # the greedy flag, on token-level requests where it is known: True, False, True, False, ...
    token_reqs = _greedy_token_requests(ref, tok)
    ours_t = SoraJaxLM(model, batch_size=4)._loglikelihood_tokens(token_reqs)
    theirs_t = _hflm(ref, tok)._loglikelihood_tokens(token_reqs)
    np.testing.assert_allclose([x for x, _ in ours_t], [x for x, _ in theirs_t], atol=TOL, rtol=0)
    assert [g for _, g in ours_t] == [g for _, g in theirs_t] == [True, False] * len(CONTEXTS)
    # one request by hand: the continuation's tokens after the context's, from torch's log-softmax
    ctx, cont = tok.encode(CONTEXTS[1]), tok.encode(CONTEXTS[1] + CONTINUATIONS[0])[len(tok.encode(CONTEXTS[1])) :]
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([ctx + cont])).logits[0].double(), -1).numpy()
    by_hand = sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))
    assert abs(ours[1 * len(CONTINUATIONS)][0] - by_hand) < TOL


def test_loglikelihood_rolling_equals_hflm(setup):
    """Texts of 3 to ~50 tokens in windows of 16: several windows each, every token scored once."""
    path, model, ref, tok = setup
    texts = [(c + x,) for c, x in zip(CONTEXTS * 2, CONTINUATIONS * 2, strict=False)] + [("true",)]
    ours = SoraJaxLM(model, batch_size=4, max_length=16).loglikelihood_rolling(
        _instances("loglikelihood_rolling", texts))
    theirs = _hflm(ref, tok, max_length=16).loglikelihood_rolling(_instances("loglikelihood_rolling", texts))
    assert max(len(tok.encode(t)) for (t,) in texts) > 32
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def test_scoring_compiles_few_shapes(setup, monkeypatch):
    """Batches of any length reuse the power-of-two buckets: 30 requests of 3..60 tokens are scored in
    (batch_size, T) arrays with T in {16, 32, 64} only (the shapes the other tests compile, plus 64)."""
    from sora_jax import harness

    path, model, ref, tok = setup
    shapes = set()
    real = harness._score

    def recording(module, params, adapter, input_ids, *args):
        shapes.add(input_ids.shape)
        return real(module, params, adapter, input_ids, *args)

    monkeypatch.setattr(harness, "_score", recording)
    rng = np.random.default_rng(0)
    rows = [(list(rng.integers(3, 200, n)), 1 + n // 3) for n in rng.integers(3, 61, 30)]
    SoraJaxLM(model, batch_size=4, max_length=64).score_windows(rows)
    assert shapes == {(4, 16), (4, 32), (4, 64)}


def test_score_windows_on_gemma2_with_final_softcap(setup, tmp_path):
    """Another family through the same code: a tiny Gemma 2 (final logit soft-capping 3.0, sliding window 5)
    saved and loaded; per-row log-probabilities and greedy flags against torch's log-softmax of
    transformers' logits. Half the rows end in torch's own greedy tokens (flag True)."""
    import test_gemma

    path, _, _, tok = setup
    ref = test_llama.torch_model(test_gemma.hf_config("gemma2"), transformers.Gemma2ForCausalLM)
    ref.save_pretrained(tmp_path / "gemma2")
    model = sora_jax.load_pretrained(tmp_path / "gemma2", task="causal_lm", load_tokenizer=False)
    rng = np.random.default_rng(0)
    rows, expected = [], []
    for i, n in enumerate(rng.integers(8, 30, 6)):
        ctx = rng.integers(1, 128, int(n)).tolist()
        with torch.no_grad():
            cont = ref.generate(input_ids=torch.tensor([ctx]), max_new_tokens=3, do_sample=False,
                                pad_token_id=0)[0, len(ctx) :].tolist()
        if i % 2:
            cont[-1] = (cont[-1] + 1) % 128
        toks = ctx + cont
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([toks[:-1]])).logits[0].double(), -1).numpy()
        pos = np.arange(len(toks) - 1 - len(cont), len(toks) - 1)
        labels = np.asarray(toks[1:])[pos]
        expected.append((logp[pos, labels].sum(), bool((logp[pos].argmax(-1) == labels).all())))
        rows.append((toks, len(cont)))
    got = SoraJaxLM(model, tokenizer=tok, batch_size=4, max_length=32).score_windows(rows)
    np.testing.assert_allclose([x for x, _ in got], [x for x, _ in expected], atol=TOL, rtol=0)
    assert [g for _, g in got] == [g for _, g in expected] == [True, False] * 3


# -- (b) a local multiple-choice task through simple_evaluate -------------------------------------------------
def _local_task(tmp_path: Path) -> list[dict]:
    docs = [
        {"question": f"Is {i} even?", "choices": ["true", "false", "answer1"], "label": i % 3} for i in range(9)
    ] + [{"question": "the correct answer is", "choices": ["The answer is 42.", "true"], "label": 1}]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "local_mc.yaml").write_text(
        "task: local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return docs


def _direct_accuracy(scorer, docs) -> tuple[float, float]:
    """acc and acc_norm (log-prob per byte) from ``scorer.loglikelihood`` of ``question`` -> ``" " + choice``."""
    acc, acc_norm = [], []
    for d in docs:
        res = scorer.loglikelihood(_instances("loglikelihood", [(d["question"], " " + c) for c in d["choices"]]))
        lls = np.array([x for x, _ in res])
        lens = np.array([len((" " + c).encode()) for c in d["choices"]])
        acc.append(np.argmax(lls) == d["label"])
        acc_norm.append(np.argmax(lls / lens) == d["label"])
    return float(np.mean(acc)), float(np.mean(acc_norm))


def test_simple_evaluate_on_a_local_task(setup, tmp_path):
    path, model, ref, tok = setup
    docs = _local_task(tmp_path)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)  # not lm_eval's own tasks: 8 s to index
    out = lm_eval.simple_evaluate(model="sora-jax", model_args=f"path={path}", tasks=["local_mc"], task_manager=tm,
                                  batch_size=4, bootstrap_iters=0, log_samples=False)
    got = out["results"]["local_mc"]
    hf = lm_eval.simple_evaluate(model=_hflm(ref, tok), tasks=["local_mc"], task_manager=tm, bootstrap_iters=0,
                                 log_samples=False)["results"]["local_mc"]
    direct = _direct_accuracy(SoraJaxLM(model, batch_size=4), docs)
    assert (got["acc,none"], got["acc_norm,none"]) == direct
    assert (hf["acc,none"], hf["acc_norm,none"]) == direct
    assert 0 < direct[0] < 1  # neither all right nor all wrong: a wrong score or label order shows


# -- (c) generate_until ------------------------------------------------------------------------------------
def test_generate_until_equals_transformers_generate(setup):
    path, model, ref, tok = setup
    prompts = [CONTEXTS[0], CONTEXTS[1], "Is 7 even?"]
    full = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            new = ref.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)[0, ids.shape[1] :]
        full.append(tok.decode(new, skip_special_tokens=True))
    stop = full[1][len(full[1]) // 2 :][:2]  # a stop string inside the second response
    assert stop and full[1].find(stop) < len(full[1]) // 2 + 1
    expected = [f[: f.find(stop)] if stop in f else f for f in full]
    assert len(expected[1]) < len(full[1])
    gen = {"until": [stop], "max_gen_toks": 12, "do_sample": False}
    reqs = _instances("generate_until", [(p, dict(gen)) for p in prompts])
    assert SoraJaxLM(model, batch_size=4).generate_until(reqs) == expected
    assert _hflm(ref, tok).generate_until(_instances("generate_until", [(p, dict(gen)) for p in prompts])) == expected


# -- (d) an adapter ----------------------------------------------------------------------------------------
def test_adapter_unmerged_merged_and_from_a_directory(setup, tmp_path):
    """A SORA adapter with non-zero factors: on activations, merged, and saved then loaded by path, the
    scores are equal, differ from the base model's, and equal HFLM's on the merged weights in torch."""
    from sora_jax.convert import params_to_hf

    path, model, ref, tok = setup
    config = sora_jax.AdapterConfig(method="sora", r=4, lora_alpha=8, rotation_rank=1,
                                    target_modules=["q_proj", "down_proj"])
    adapter = sora_jax.init_adapter(jax.random.key(0), model.params, config)
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    adapter = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), adapter)
    pairs = [(c, x) for c in CONTEXTS[1:] for x in CONTINUATIONS[:3]]  # all under 16 tokens: one shape
    run = lambda scorer: np.array([x for x, _ in scorer.loglikelihood(_instances("loglikelihood", pairs))])
    base = run(SoraJaxLM(model, batch_size=4))
    unmerged = run(SoraJaxLM(model, adapter=adapter, batch_size=4))
    merged = run(SoraJaxLM(model, adapter=adapter, merge=True, batch_size=4))
    sora_jax.save_adapter(adapter, tmp_path / "adapter")
    from_dir = run(SoraJaxLM(str(path), adapter=str(tmp_path / "adapter"), batch_size=4))
    assert np.abs(unmerged - base).max() > 0.1
    np.testing.assert_allclose(unmerged, merged, atol=TOL, rtol=0)
    np.testing.assert_allclose(from_dir, unmerged, atol=TOL, rtol=0)
    ref_merged = type(ref)(ref.config).eval()
    ref_merged.load_state_dict({k: torch.from_numpy(np.array(v))
                                for k, v in params_to_hf(sora_jax.merge(model.params, adapter)).items()}, strict=False)
    ref_merged.tie_weights()
    np.testing.assert_allclose(merged, run(_hflm(ref_merged, tok)), atol=TOL, rtol=0)


def test_peft_adapter_directory(setup, tmp_path):
    """A DoRA adapter written in PEFT's layout (export_peft_adapter) and given by path scores as the
    Adapter object does (both merged: the base model's compiled shapes)."""
    path, model, ref, tok = setup
    config = sora_jax.AdapterConfig(method="dora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adapter = sora_jax.init_adapter(jax.random.key(2), model.params, config)
    keys = iter(jax.random.split(jax.random.key(3), 1000))
    adapter = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), adapter)
    sora_jax.export_peft_adapter(model, adapter, tmp_path / "peft")
    pairs = [(c, x) for c in CONTEXTS[1:] for x in CONTINUATIONS[:3]]
    run = lambda scorer: np.array([x for x, _ in scorer.loglikelihood(_instances("loglikelihood", pairs))])
    from_dir = run(SoraJaxLM(model, adapter=str(tmp_path / "peft"), merge=True, batch_size=4))
    np.testing.assert_allclose(from_dir, run(SoraJaxLM(model, adapter=adapter, merge=True, batch_size=4)),
                               atol=TOL, rtol=0)
    assert np.abs(from_dir - run(SoraJaxLM(model, batch_size=4))).max() > 0.1


# -- the command line and bad input ------------------------------------------------------------------------
def test_command_line_runs_a_local_task(setup, tmp_path, monkeypatch):
    """``python -m sora_jax.harness`` is lm_eval's CLI with ``sora-jax`` registered (run in-process here:
    the same ``main()``)."""
    from sora_jax import harness

    path, *_ = setup
    _local_task(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "lm_eval", "--model", "sora-jax", "--model_args", f"path={path}", "--tasks", "local_mc", "--include_path",
        str(tmp_path), "--limit", "2", "--batch_size", "4", "--output_path", str(out),
    ])
    # lm_eval's built-in tasks are left out of the index (8 s of YAML parsing); the local task is all it needs
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    harness.main()
    results = list(out.rglob("results_*.json"))
    assert len(results) == 1
    got = json.loads(results[0].read_text())
    assert got["results"]["local_mc"]["acc,none"] in (0.0, 0.5, 1.0) and got["config"]["model"] == "sora-jax"


def test_bad_input_is_one_clear_error(setup):
    path, model, ref, tok = setup
    with pytest.raises(TypeError, match="unknown model_args for sora-jax: \\['pretrained'\\]"):
        SoraJaxLM(pretrained=str(path))
    with pytest.raises(ValueError, match="merge=True needs adapter="):
        SoraJaxLM(model, merge=True)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        SoraJaxLM(model, batch_size=0)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        SoraJaxLM(model, adapter=str(path / "nowhere"))
    with pytest.raises(ValueError, match="decodes greedily"):
        SoraJaxLM(model, batch_size=4).generate_until(_instances("generate_until", [("hi", {"do_sample": True, "temperature": 1.0})]))
    with pytest.raises(ValueError, match="needs a causal LM"):  # refused before any work
        SoraJaxLM(type("M", (), {"task": "sequence_classification", "module": None})())
