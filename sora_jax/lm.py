"""Instruction fine-tuning of causal LMs: the loss, the data in LLM-Adapters' format, answer extraction.

- :func:`chunked_cross_entropy`: token cross-entropy over the vocabulary in chunks (an online
  log-sum-exp, each chunk recomputed in the backward pass), so that the ``(tokens, vocab)`` logits are
  never held at once: ``O(tokens x chunk)`` memory. Value and gradient equal the plain loss.
- :func:`token_logprobs`: per-token log-probabilities of given labels and whether each is the arg-max,
  the same chunked way (forward only; scoring for evaluation, :mod:`sora_jax.harness`).
- :func:`causal_lm_loss`: the ``loss_fn`` of :class:`sora_jax.train.Trainer` for a causal LM run with
  ``return_logits=False`` (the output projection taken from the parameters: the tied input embedding or
  ``lm_head``; Gemma's final soft-capping applied per chunk).
- :func:`prompt`, :func:`encode_examples`, :func:`epoch_batches`: LLM-Adapters' prompt (no input field),
  the target ``output`` + EOS after it, the loss on response tokens only, batches bucketed by length.
- :func:`extract_answer`, :func:`is_correct`: LLM-Adapters' answer extraction per task (the first answer
  word of the task's vocabulary; the last number for arithmetic, within 0.001; AQuA's option letter).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


# -- the loss ----------------------------------------------------------------------------------------
def _chunk_logits(
    hidden: Array, out_kernel: Array, i: Array, chunk: int, softcap: float | None, f: Any
) -> tuple[Array, Array, Array]:
    """Vocabulary chunk ``i``: logits ``(N, chunk)`` (``-inf`` on columns an earlier chunk counted: the
    last chunk overlaps the one before), their column ids ``(chunk,)`` and the mask of fresh columns."""
    v = out_kernel.shape[1]
    start = jnp.minimum(i * chunk, v - chunk)
    w = jax.lax.dynamic_slice_in_dim(out_kernel, start, chunk, axis=1)
    logits = jnp.dot(hidden, w.astype(hidden.dtype), preferred_element_type=f)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    cols = start + jnp.arange(chunk)
    fresh = cols >= i * chunk  # columns not counted by an earlier chunk
    return jnp.where(fresh[None, :], logits, -jnp.inf), cols, fresh


def chunked_cross_entropy(
    hidden: Array, out_kernel: Array, labels: Array, weights: Array, chunk: int = 8192, softcap: float | None = None
) -> tuple[Array, Array]:
    """``(sum_i w_i CE_i, sum_i w_i)`` with logits ``softcap(hidden @ out_kernel)`` formed chunk by chunk.

    Args:
      hidden: ``(N, H)``; out_kernel: ``(H, V)``; labels: ``(N,)`` int; weights: ``(N,)`` (0: no loss).
      chunk: vocabulary columns per chunk (the last chunk overlaps the one before; overlapping columns
        are counted once).
      softcap: ``cap * tanh(logits / cap)`` before the softmax (Gemma 2/3), or None.

    Logits and the log-sum-exp are float32 (float64 for float64 inputs). The backward pass recomputes each
    chunk's logits (``jax.checkpoint``), so memory stays ``O(N x chunk)`` plus ``O(N)`` per chunk.
    """
    n, _ = hidden.shape
    v = out_kernel.shape[1]
    chunk = int(min(chunk, v))
    n_chunks = -(-v // chunk)
    labels = labels.astype(jnp.int32)
    f = jnp.promote_types(hidden.dtype, jnp.float32)  # float32 at least (float64 stays float64)

    @jax.checkpoint
    def body(carry, i):
        m, s, gold = carry
        logits, cols, fresh = _chunk_logits(hidden, out_kernel, i, chunk, softcap, f)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        gold = gold + jnp.sum(jnp.where((cols[None, :] == labels[:, None]) & fresh[None, :], logits, 0.0), axis=1)
        return (m_new, s, gold), None

    init = (jnp.full((n,), -jnp.inf, f), jnp.zeros((n,), f), jnp.zeros((n,), f))
    (m, s, gold), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    per = m + jnp.log(s) - gold
    w = weights.astype(f)
    return jnp.sum(jnp.where(w > 0, per * w, 0.0)), jnp.sum(w)


def token_logprobs(
    hidden: Array, out_kernel: Array, labels: Array, chunk: int = 8192, softcap: float | None = None
) -> tuple[Array, Array]:
    """Per-token ``log p(label)`` and whether ``label`` is the arg-max, with the logits
    ``softcap(hidden @ out_kernel)`` formed chunk by chunk (as :func:`chunked_cross_entropy`; forward only).

    Args:
      hidden: ``(N, H)``; out_kernel: ``(H, V)``; labels: ``(N,)`` int; chunk, softcap: as
        :func:`chunked_cross_entropy`.

    Returns:
      ``(logprob (N,), greedy (N,) bool)``: float32 (float64 for float64 inputs) log-probabilities, and
      ``label == argmax(logits)`` (the first maximum on ties, as ``argmax``).
    """
    n, _ = hidden.shape
    v = out_kernel.shape[1]
    chunk = int(min(chunk, v))
    labels = labels.astype(jnp.int32)
    f = jnp.promote_types(hidden.dtype, jnp.float32)

    def body(carry, i):
        m, s, gold, best = carry
        logits, cols, fresh = _chunk_logits(hidden, out_kernel, i, chunk, softcap, f)
        c_max = jnp.max(logits, axis=1)
        c_arg = cols[jnp.argmax(logits, axis=1)]
        best = jnp.where(c_max > m, c_arg, best)  # strict: an earlier chunk keeps a tie
        m_new = jnp.maximum(m, c_max)
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        gold = gold + jnp.sum(jnp.where((cols[None, :] == labels[:, None]) & fresh[None, :], logits, 0.0), axis=1)
        return (m_new, s, gold, best), None

    init = (jnp.full((n,), -jnp.inf, f), jnp.zeros((n,), f), jnp.zeros((n,), f), jnp.zeros((n,), jnp.int32))
    (m, s, gold, best), _ = jax.lax.scan(body, init, jnp.arange(-(-v // chunk)))
    return gold - m - jnp.log(s), best == labels


def output_kernel(params: Mapping[str, Any]) -> Array:
    """The causal LM's output projection ``(hidden, vocab)``: ``lm_head/kernel``, or the tied input
    embedding transposed."""
    if "lm_head" in params:
        return params["lm_head"]["kernel"]
    return params["model"]["embed_tokens"]["embedding"].T


def causal_lm_loss(chunk: int = 8192, softcap: float | None = None):
    """A :class:`sora_jax.train.Trainer` ``loss_fn``: token cross-entropy of ``batch["labels"] (B, T)``
    (the next token at each position) weighted by ``batch["weights"] (B, T)``, from the model's
    ``last_hidden_state`` (run it with ``return_logits=False``) through :func:`chunked_cross_entropy`."""

    def loss_fn(outputs: Mapping[str, Array], batch: Mapping[str, Any], params: Mapping[str, Any]):
        h = outputs["last_hidden_state"]
        h = h.reshape(-1, h.shape[-1])
        labels = jnp.asarray(batch["labels"]).reshape(-1)
        weights = jnp.asarray(batch["weights"]).reshape(-1)
        return chunked_cross_entropy(h, output_kernel(params), labels, weights, chunk, softcap)

    return loss_fn


# -- data ----------------------------------------------------------------------------------------------
def prompt(example: Mapping[str, Any]) -> str:
    """LLM-Adapters' prompt for ``{"instruction", "input"}`` (the response follows it)."""
    if example.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT.format(instruction=example["instruction"])


def encode_examples(tokenizer: Any, examples: Sequence[Mapping[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Token ids of ``prompt + output + EOS`` (BOS first where the tokenizer adds one), cut to
    ``max_length``, with ``n_prompt`` (prompt tokens, no loss) per example."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token before training.")
    out = []
    for ex in examples:
        p_ids = tokenizer(prompt(ex))["input_ids"]
        full = tokenizer(prompt(ex) + ex["output"])["input_ids"]
        if full[: len(p_ids)] != p_ids:  # a merge across the boundary: tokenise the parts apart
            full = p_ids + tokenizer(ex["output"], add_special_tokens=False)["input_ids"]
        ids = (list(full) + [eos])[:max_length]
        out.append({"input_ids": ids, "n_prompt": min(len(p_ids), len(ids))})
    return out


def bucket_length(n: int, multiple: int = 16) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (few distinct shapes, few compilations)."""
    return int(math.ceil(n / multiple) * multiple)


def epoch_batches(
    encoded: Sequence[Mapping[str, Any]], batch_size: int, seed: int, epoch: int, pad_id: int, multiple: int = 16
) -> list[dict[str, np.ndarray]]:
    """One epoch's batches, bucketed by length: shuffled (``seed``, ``epoch``), cut into groups of 50
    batches, sorted by length within a group, split into batches each padded (on the right) to its
    longest row rounded up to ``multiple``, batch order shuffled again. A short last batch is filled with
    weight-0 rows. Each batch: ``input_ids``, ``attention_mask``, ``labels`` (the next token),
    ``weights`` (1 where the next token is a response token), all ``(batch_size, T)``, and ``index``."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(encoded))
    group = 50 * batch_size
    batches = []
    for g in range(0, len(order), group):
        idx = sorted(order[g : g + group], key=lambda i: len(encoded[i]["input_ids"]))
        for b in range(0, len(idx), batch_size):
            rows = list(idx[b : b + batch_size])
            t = bucket_length(max(len(encoded[i]["input_ids"]) for i in rows), multiple)
            ids = np.full((batch_size, t), pad_id, np.int32)
            mask = np.zeros((batch_size, t), np.int32)
            labels = np.zeros((batch_size, t), np.int32)
            weights = np.zeros((batch_size, t), np.float32)
            for r, i in enumerate(rows):
                x = encoded[i]["input_ids"]
                ids[r, : len(x)], mask[r, : len(x)] = x, 1
                labels[r, : len(x) - 1] = x[1:]
                weights[r, encoded[i]["n_prompt"] - 1 : len(x) - 1] = 1.0
            index = np.asarray(rows + [-1] * (batch_size - len(rows)))
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights,
                            "index": index})
    return [batches[i] for i in rng.permutation(len(batches))]


# -- answer extraction (LLM-Adapters' commonsense_evaluate.py / evaluate.py) ------------------------------
COMMONSENSE_ANSWERS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}
MATH_TASKS = ("gsm8k", "SVAMP", "AddSub", "MultiArith", "SingleEq", "AQuA")
COMMONSENSE_TASKS = ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")


def extract_answer(task: str, response: str) -> str | float | None:
    """The answer in a generated ``response``, as LLM-Adapters extracts it: commonsense tasks, the first
    word of the task's answer vocabulary (``true|false``, ``solution1|2``, ``answer1..5``,
    ``option1|2``); AQuA, the first option letter A-E; other math tasks, the last number (commas
    removed), as a float. None when there is none."""
    if task in COMMONSENSE_ANSWERS:
        found = re.findall(COMMONSENSE_ANSWERS[task], response.strip())
        return found[0] if found else None
    if task == "AQuA":
        found = re.findall(r"A|B|C|D|E", response.strip())
        return found[0] if found else None
    if task in MATH_TASKS:
        found = [s for s in re.findall(r"-?\d+\.?\d*", response.replace(",", "")) if s not in ("-", ".")]
        if not found:
            return None
        try:
            return float(found[-1])
        except ValueError:
            return None
    raise ValueError(f"unknown task {task!r}; known: {sorted(COMMONSENSE_ANSWERS)} and {list(MATH_TASKS)}")


def is_correct(task: str, response: str, answer: str) -> bool:
    """Whether ``response`` answers ``answer`` (math: within 0.001 of the number)."""
    got = extract_answer(task, response)
    if got is None:
        return False
    if isinstance(got, float):
        try:
            return abs(got - float(answer)) <= 0.001
        except ValueError:
            return False
    return got == str(answer).strip()
