"""Causal-LM fine-tuning pieces (sora_jax.lm) and experiments/reasoning.py end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

from sora_jax import lm


# -- the chunked loss ------------------------------------------------------------------------------------
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_cross_entropy_equals_the_plain_loss(chunk, softcap):
    """Value and gradients (hidden states and output kernel) against optax's cross-entropy of the full
    logits, float64 (so the only difference is the order of the sums: 1e-10). Chunk 7 does not divide the
    vocabulary of 50 (the last chunk overlaps); 1000 is larger than it. Weight 0 rows drop out."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        h = jnp.asarray(rng.normal(size=(12, 16)))
        w = jnp.asarray(rng.normal(size=(16, 50)))
        labels = jnp.asarray(rng.integers(0, 50, 12))
        weights = jnp.asarray((rng.random(12) > 0.3).astype(np.float64))

        def plain(h, w):
            logits = h @ w
            if softcap is not None:
                logits = softcap * jnp.tanh(logits / softcap)
            per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return jnp.sum(per * weights)

        def chunked(h, w):
            return lm.chunked_cross_entropy(h, w, labels, weights, chunk=chunk, softcap=softcap)[0]

        v0, g0 = jax.value_and_grad(plain, argnums=(0, 1))(h, w)
        v1, g1 = jax.value_and_grad(chunked, argnums=(0, 1))(h, w)
        np.testing.assert_allclose(v1, v0, rtol=1e-10)
        for a, b in zip(g1, g0, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        assert lm.chunked_cross_entropy(h, w, labels, weights, chunk)[1] == weights.sum()


# -- data ----------------------------------------------------------------------------------------------
class CharTokenizer:
    """Characters as tokens (id = ord % 100 + 3; BOS 1, EOS 2): enough to check where the loss falls."""

    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) % 100 + 3 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_loss_weights_cover_the_response_and_eos_only():
    ex = {"instruction": "Q?", "input": "", "output": "the correct answer is true", "answer": "true"}
    enc = lm.encode_examples(CharTokenizer(), [ex, {**ex, "output": "no"}], max_length=512)
    (b,) = lm.epoch_batches(enc, batch_size=3, seed=0, epoch=0, pad_id=0)
    assert b["input_ids"].shape == (3, lm.bucket_length(len(enc[0]["input_ids"])))
    for r in range(2):
        i = b["index"][r]
        ids, n_prompt = enc[i]["input_ids"], enc[i]["n_prompt"]
        assert n_prompt == len(lm.prompt(ex)) + 1  # BOS + prompt characters
        target = np.asarray(ids[n_prompt:])  # the response and EOS: exactly the weighted next tokens
        np.testing.assert_array_equal(b["labels"][r][b["weights"][r] > 0], target)
        assert target[-1] == 2
    assert b["index"][2] == -1 and b["weights"][2].sum() == 0  # the filler row


# -- answer extraction ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task, response, answer, expected",
    [
        ("boolq", "the correct answer is true", "true", True),
        ("boolq", "The correct answer is false. It is not true", "true", False),  # the first match counts
        ("piqa", "the correct answer is solution2", "solution2", True),
        ("social_i_qa", "the correct answer is answer3", "answer1", False),
        ("winogrande", "the correct answer is option1", "option1", True),
        ("ARC-Easy", "answer4 is right", "answer4", True),
        ("ARC-Challenge", "I am not sure", "answer2", False),
        ("openbookqa", "the correct answer is answer1", "answer1", True),
        ("gsm8k", "She pays 3 * 4 = 12 dollars.\nThe answer is 1,200.", "1200.0", True),
        ("SVAMP", "The answer is 7.5", "7.5", True),
        ("AddSub", "The answer is 8.0001", "8", True),  # within 0.001
        ("MultiArith", "The answer is 8.01", "8", False),
        ("SingleEq", "x = -3", "-3.0", True),
        ("SingleEq", "no number", "3", False),
        ("AQuA", "The answer is C.", "C", True),
        ("AQuA", "Between B and D, the answer is D", "D", False),  # the first letter counts
    ],
)
def test_answer_extraction(task, response, answer, expected):
    assert lm.is_correct(task, response, answer) is expected


# -- reasoning.py end to end ----------------------------------------------------------------------------
def tiny_model_dir(path: Path) -> Path:
    """A tiny random LLaMA causal LM with a byte-level BPE tokenizer (trained offline on a few strings)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([lm.PROMPT, "the correct answer is true false answer1 answer2 The answer is 42."], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    import torch

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def tiny_data_dir(path: Path) -> Path:
    rows = lambda ans: [{"instruction": f"Is {i} even?\nAnswer format: true/false", "input": "",
                         "output": f"the correct answer is {ans}", "answer": ans} for i in range(6)]
    for task in ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"):
        (path / "commonsense" / task).mkdir(parents=True)
        (path / "commonsense" / task / "train.json").write_text(json.dumps(rows("true")))
        (path / "commonsense" / task / "test.json").write_text(json.dumps(rows("true")))
    return path


@pytest.fixture(scope="module")
def reasoning():
    from experiments import reasoning

    return reasoning


def test_reasoning_end_to_end_and_resume(tmp_path, reasoning):
    model = tiny_model_dir(tmp_path / "model")
    data = tiny_data_dir(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["--suite", "commonsense", "--model", str(model), "--data-dir", str(data), "--tasks", "boolq,ARC-Easy",
            "--method", "sora", "--r", "2", "--batch-size", "4", "--max-train-samples", "12", "--epochs", "2",
            "--max-eval-samples", "3", "--max-new-tokens", "4", "--eval-batch-size", "4", "--output-dir", str(out),
            "--no-progress", "--lr", "1e-2"]
    assert reasoning.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and res["total_steps"] == 6 and len(res["history"]) == 2
    assert set(res["accuracy"]) == {"boolq", "ARC-Easy"} and res["num_eval_examples"] == {"boolq": 3, "ARC-Easy": 3}
    assert res["average"] == pytest.approx(np.mean(list(res["accuracy"].values())))
    assert res["config"]["adapter"]["method"] == "sora" and res["parameters"]["trainable"] > 0
    assert res["history"][1]["train_loss"] < res["history"][0]["train_loss"]  # it learns the fixed answer
    assert "median_s" in res["timing"] and "jax" in res["versions"] and res["spectrum"]
    assert len(json.loads((out / "predictions" / "boolq.json").read_text())["responses"]) == 3
    # resume: training is done, predictions are reused, the same numbers come back
    assert reasoning.main([*argv, "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["accuracy"] == res["accuracy"] and again["resumed_from_step"] == 6


def test_reasoning_zero_shot_evaluates_the_base_model(tmp_path, reasoning, monkeypatch, capsys):
    """``--zero-shot``: no training, no adapter, no spectrum; the run is named for the base model, not for
    the (unused) default method."""
    model = tiny_model_dir(tmp_path / "model")
    data = tiny_data_dir(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    argv = ["--suite", "commonsense", "--model", str(model), "--data-dir", str(data), "--tasks", "boolq",
            "--zero-shot", "--max-eval-samples", "3", "--max-new-tokens", "4", "--no-progress"]  # fmt: skip
    assert reasoning.main(argv) == 0
    out = tmp_path / "runs" / "commonsense-zero_shot-model-s0"
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and res["spectrum"] == {} and res["scores"]["boolq"]["n"] == 3
    assert not (out / "adapter").exists()
    assert "commonsense/zero_shot: average accuracy" in capsys.readouterr().out


def test_reasoning_bad_input_is_one_clear_error(tmp_path, reasoning, capsys):
    assert reasoning.main(["--suite", "math", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "math/gsm8k/test.json does not exist; pass --data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reasoning.parse_args(["--suite", "commonsense", "--tasks", "boolq,gsm8k"])
    assert "unknown commonsense task(s) ['gsm8k']" in capsys.readouterr().err
    bad = tmp_path / "commonsense" / "boolq"
    bad.mkdir(parents=True)
    (bad / "test.json").write_text('[{"instruction": "x"}]')
    assert reasoning.main(["--suite", "commonsense", "--tasks", "boolq", "--data-dir", str(tmp_path)]) == 2
    assert "record 0: needs string fields 'instruction' and 'output'" in capsys.readouterr().err
