"""Batched greedy decoding for the causal LMs of ``sora_jax.models`` (LLaMA, Gemma), with a key/value cache.

:func:`greedy_generate` is one jit-compiled function: a prefill of the left-padded prompts writes every
layer's keys and values into a cache of ``prompt + max_new_tokens`` slots, then a ``lax.while_loop``
feeds back the arg-max token one position at a time until every row has produced an end-of-sequence
token or ``max_new_tokens`` are out. Positions count from each row's first real token (as
``transformers``' ``generate`` does for left padding), so padding never shifts a row's rotary phases.

An adapter runs either unmerged, on activations (``adapter=``: the model's dense layers run
``sora_jax.adapted_dense(adapter)``; the adapter is a traced argument, so new adapter values do not
recompile), or merged into the weights beforehand (``params=sora_jax.merge(params, adapter)``).

:func:`generate_text` wraps it for strings: tokenises with left padding (prompt lengths rounded up to
``pad_to_multiple_of`` so that few shapes compile), decodes, and cuts each response at the first stop
string (checked on the decoded text after decoding, which for greedy decoding gives the same text as
stopping there).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.models.llama import init_cache

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens"))
def _greedy(
    module: nn.Module,
    params: Any,
    adapter: Any,
    input_ids: Array,
    attention_mask: Array,
    eos_ids: Array,
    pad_token_id: Array,
    max_new_tokens: int,
) -> tuple[Array, Array]:
    if adapter is not None:
        from sora_jax.dense import adapted_dense, input_norms

        # DoRA's column norms are constants of the weights and the adapter: once here, not in every step
        module = module.clone(dense_fn=adapted_dense(adapter, norms=input_norms(params, adapter)))
    b, p = input_ids.shape
    length = p + max_new_tokens
    cache = init_cache(module.config, b, length, module.dtype)
    mask = jnp.concatenate([attention_mask, jnp.ones((b, max_new_tokens), attention_mask.dtype)], axis=1)
    positions = jnp.clip(jnp.cumsum(attention_mask, axis=1) - 1, 0, None)

    def run(ids, pos, cache, index):
        out = module.apply({"params": params}, ids, mask, pos, cache=cache, cache_index=index, logits_to_keep=1)
        return jnp.argmax(out["logits"][:, -1], axis=-1).astype(jnp.int32), out["cache"]

    token, cache = run(input_ids, positions, cache, 0)
    tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)
    state = (jnp.int32(0), cache, token, positions[:, -1], jnp.zeros((b,), bool), tokens)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, token, pos, done, tokens = state
        token = jnp.where(done, pad_token_id, token)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        done = done | jnp.isin(token, eos_ids)
        pos = pos + 1
        nxt, cache = jax.lax.cond(
            (i + 1 < max_new_tokens) & ~jnp.all(done),
            lambda: run(token[:, None], pos[:, None], cache, p + i),
            lambda: (token, cache),
        )
        return i + 1, cache, nxt, pos, done, tokens

    steps, *_, done, tokens = jax.lax.while_loop(cond, body, state)
    return tokens, steps


def greedy_generate(
    module: nn.Module,
    params: Any,
    input_ids: Any,
    attention_mask: Any | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    adapter: Any = None,
) -> np.ndarray:
    """Greedy continuations ``(batch, max_new_tokens)`` int32 of left-padded prompts.

    Args:
      module: a causal-LM module of ``sora_jax.models`` (``task="causal_lm"``; it takes ``cache``).
      params: its parameters (a merged adapter already applied, if any).
      input_ids, attention_mask: ``(batch, prompt_len)``, padding on the left (1 = token, 0 = padding).
      max_new_tokens: how many tokens to generate at most.
      eos_token_id: end-of-sequence id(s): a row stops after producing one (it is kept in the output).
      pad_token_id: written after a row has stopped.
      adapter: an unmerged ``sora_jax.Adapter`` run on activations, or None.

    Returns:
      ``(batch, max_new_tokens)``: the new tokens, ``pad_token_id`` after each row's end.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, prompt_len) with prompt_len >= 1, got shape {ids.shape}.")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}.")
    if (mask[:, -1] == 0).any() or (np.diff(mask, axis=1) < 0).any():
        raise ValueError(
            "prompts must be left-padded (each attention_mask row 0...0 1...1, ending in 1); tokenize with "
            "padding_side='left'."
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if getattr(module, "task", "causal_lm") != "causal_lm":
        raise ValueError(f"generation needs a causal-LM module (task='causal_lm'), got task {module.task!r}.")
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos_ids = jnp.asarray(eos or [-1], jnp.int32)
    tokens, _ = _greedy(
        module, params, adapter, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), eos_ids,
        jnp.int32(pad_token_id), int(max_new_tokens),
    )
    return np.asarray(tokens)


def cut_at_stop(text: str, stop: Sequence[str] = ()) -> str:
    """``text`` up to (not including) the earliest occurrence of any string in ``stop``."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def generate_text(
    module: nn.Module,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    adapter: Any = None,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    pad_to_multiple_of: int = 16,
    eos_token_id: int | Sequence[int] | None = None,
) -> list[str]:
    """Greedy responses to ``prompts`` (decoded, special tokens skipped, cut at the first ``stop`` string).

    Prompts are generated in batches of ``batch_size`` (the last one padded with copies), tokenised with
    left padding to a multiple of ``pad_to_multiple_of``. ``eos_token_id`` defaults to the tokenizer's.
    """
    if not prompts:
        return []
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if isinstance(eos, int) else 0)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n) if len(prompts) > batch_size else []
        enc = tokenizer(chunk, padding=True, padding_side="left", pad_to_multiple_of=pad_to_multiple_of,
                        return_tensors="np")
        tokens = greedy_generate(
            module, params, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
            eos_token_id=eos, pad_token_id=pad, adapter=adapter,
        )
        for row in tokens[:n]:
            out.append(cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop))
    return out
