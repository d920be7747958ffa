"""EleutherAI's lm-evaluation-harness (``lm_eval``) over the causal LMs of ``sora_jax.models``.

:class:`SoraJaxLM` is an ``lm_eval`` model (``TemplateLM``) registered as ``sora-jax``: any sora-jax
causal LM (LLaMA, Gemma), loaded by :func:`sora_jax.load_pretrained` or given as a
:class:`~sora_jax.hub.PretrainedModel`, with an optional adapter run on activations (unmerged) or merged
into the weights. It implements the three request types:

- ``loglikelihood``: context and continuation are tokenised together and split as ``lm_eval``'s
  ``HFLM`` does (``TemplateLM._encode_pair``; an empty context becomes the BOS token); the
  continuation's summed log-probability and whether greedy decoding would produce it.
- ``loglikelihood_rolling``: the whole text in ``max_length`` windows (``lm_eval.utils``'
  ``get_rolling_token_windows`` / ``make_disjoint_window``, as ``HFLM``), every token scored once.
- ``generate_until``: greedy decoding through :func:`sora_jax.generate.greedy_generate` (KV cache,
  left padding), stopping on EOS or ``max_gen_toks``, cut at the first ``until`` string.

Scoring is one jit-compiled function over ``(batch_size, T)`` right-padded token windows, with ``T`` a
power of two (at least 16, at most ``max_length``) so that few shapes compile; the log-probabilities are
formed chunk by chunk over the vocabulary (:func:`sora_jax.lm.token_logprobs`), never as a
``(batch, T, vocab)`` array. Prompts for generation are left-padded to the same power-of-two buckets.

From the command line (this module registers the model before running ``lm_eval``'s own CLI)::

    python -m sora_jax.harness --model sora-jax --model_args path=smollm2,adapter=run/adapter --tasks piqa

and from Python::

    import lm_eval, sora_jax.harness
    lm_eval.simple_evaluate(model="sora-jax", model_args={"path": "smollm2", "adapter": "run/adapter"},
                            tasks=["piqa"])

``lm_eval`` is an optional dependency (``pip install sora-jax[eval]``); ``import sora_jax`` does not
import it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

try:
    import lm_eval.models  # noqa: F401  (registers lm_eval's own models first: get_model only does so on an empty registry)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
    from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, resolve_max_length
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "sora_jax.harness needs lm-evaluation-harness: pip install 'sora-jax[eval]' (or pip install lm-eval)"
    ) from e

from sora_jax.adapter import Adapter, apply_adapter, check_compatible
from sora_jax.adapter import merge as merge_adapter
from sora_jax.dense import adapted_dense
from sora_jax.generate import cut_at_stop, greedy_generate
from sora_jax.lm import output_kernel, token_logprobs

Array = jax.Array
log = logging.getLogger(__name__)

NAME = "sora-jax"
MIN_BUCKET = 16
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def bucket(n: int, cap: int) -> int:
    """The padded length of ``n`` tokens: the next power of two ``>= max(n, 16)``, at most ``cap``
    (``n <= cap``)."""
    return min(max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length()), max(cap, n))


@functools.partial(jax.jit, static_argnames=("module", "chunk", "softcap"))
def _score(
    module: nn.Module,
    params: Any,
    adapter: Adapter | None,
    input_ids: Array,
    labels: Array,
    weights: Array,
    chunk: int,
    softcap: float | None,
) -> tuple[Array, Array]:
    """Summed log-probability ``(B,)`` of ``labels`` where ``weights > 0`` and whether each of those
    labels is the arg-max ``(B,)``, for right-padded ``input_ids, labels, weights: (B, T)``."""
    out_params = params
    if adapter is not None:
        module = module.clone(dense_fn=adapted_dense(adapter))
        if "lm_head" in adapter.layers:  # an adapted output projection: its effective kernel
            out_params = apply_adapter({"lm_head": params["lm_head"]}, _only(adapter, "lm_head"))
    h = module.apply({"params": params}, input_ids, return_logits=False)["last_hidden_state"]
    b, t, d = h.shape
    logp, greedy = token_logprobs(h.reshape(b * t, d), output_kernel(out_params), labels.reshape(-1), chunk, softcap)
    scored = weights > 0
    total = jnp.sum(jnp.where(scored, logp.reshape(b, t), 0.0), axis=1)
    return total, jnp.all(greedy.reshape(b, t) | ~scored, axis=1)


def _only(adapter: Adapter, path: str) -> Adapter:
    """``adapter`` restricted to the module at ``path``."""
    return Adapter(adapter.config, {path: adapter.layers[path]})


def _load_adapter(adapter: Any, model: Any) -> tuple[Adapter, Any]:
    """``(adapter, params)`` from an :class:`~sora_jax.Adapter` or a directory: a sora-jax adapter
    (:func:`sora_jax.save_adapter`) or a PEFT LoRA/DoRA one (:func:`sora_jax.load_peft_adapter`, whose
    ``modules_to_save`` are written into the parameters)."""
    if isinstance(adapter, Adapter):
        return adapter, model.params
    d = Path(os.fspath(adapter)).expanduser()
    cfg = d / "adapter_config.json"
    if not cfg.is_file():
        raise FileNotFoundError(
            f"adapter={adapter!s}: no adapter_config.json in {d}; give a directory written by "
            f"sora_jax.save_adapter (or a PEFT adapter directory)"
        )
    from sora_jax.io import FORMAT, load_adapter

    if json.loads(cfg.read_text()).get("format") == FORMAT:
        return load_adapter(d), model.params
    from sora_jax.peft_import import load_peft_adapter

    loaded = load_peft_adapter(d, model)
    return loaded.adapter, loaded.params


class SoraJaxLM(TemplateLM):
    """An ``lm_eval`` model over a sora-jax causal LM (registered as ``"sora-jax"``).

    Args:
      path: a model directory, ``.gguf`` file or alias for :func:`sora_jax.load_pretrained` (``task=
        "causal_lm"``), or a loaded :class:`~sora_jax.hub.PretrainedModel`.
      adapter: an :class:`~sora_jax.Adapter`, or a directory holding one (:func:`sora_jax.save_adapter`)
        or a PEFT LoRA/DoRA adapter; None for the base model.
      merge: merge the adapter into the weights (base-model cost) instead of running it on activations.
      batch_size: rows per compiled call (``"auto"`` is taken as the default 8); every batch is padded to it.
      max_length: the context window in tokens (default: the config's ``max_position_embeddings``, as
        ``HFLM``); rolling windows and left truncation use it.
      max_gen_toks: default generation budget when a request does not set one.
      dtype: compute dtype when loading from ``path`` (``"float32"``, ``"bfloat16"``, ``"float16"``).
      vocab_chunk: vocabulary columns per chunk of the log-softmax.
      add_bos_token: force (True/False) the tokenizer's special tokens on encoding; None: its default.
      tokenizer: a tokenizer (or a directory for ``AutoTokenizer``) to use instead of the model's.
      device, max_batch_size: accepted for ``lm_eval``'s CLI and ignored (JAX uses its default device).
    """

    def __init__(
        self,
        path: Any = None,
        adapter: Any = None,
        merge: bool = False,
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str = "float32",
        vocab_chunk: int = 8192,
        add_bos_token: bool | None = None,
        tokenizer: Any = None,
        device: str | None = None,
        max_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(
                f"unknown model_args for {NAME}: {sorted(kwargs)}; known: path, adapter, merge, batch_size, "
                f"max_length, max_gen_toks, dtype, vocab_chunk, add_bos_token, tokenizer"
            )
        if path is None:
            raise ValueError(f"{NAME} needs path= (a model directory, .gguf file or alias, or a PretrainedModel)")
        self._batch_size = _batch_size(batch_size)
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
        for name, value in (("max_gen_toks", max_gen_toks), ("vocab_chunk", vocab_chunk)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        if isinstance(path, (str, os.PathLike)):
            from sora_jax.hub import load_pretrained

            model = load_pretrained(path, task="causal_lm", dtype=DTYPES[dtype], load_tokenizer=tokenizer is None)
        else:
            model = path
        if getattr(model, "task", None) != "causal_lm" or getattr(model.module, "task", None) != "causal_lm":
            raise ValueError(
                f"{NAME} needs a causal LM (task='causal_lm'), got task {getattr(model, 'task', None)!r}; "
                f"load it with sora_jax.load_pretrained(path, task='causal_lm')"
            )
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if self.tokenizer is None:
            raise ValueError(
                f"the model at {path!s} has no tokenizer files; pass tokenizer= (an object or a directory)"
            )
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token first")
        params = model.params
        adapter_obj = None
        if adapter is not None:
            adapter_obj, params = _load_adapter(adapter, model)
            check_compatible(params, adapter_obj)
            if merge:
                params, adapter_obj = merge_adapter(params, adapter_obj), None
        elif merge:
            raise ValueError("merge=True needs adapter= (there is nothing to merge)")
        self.model = model
        self.module = model.module
        self.params = params
        self.adapter = adapter_obj
        self.add_bos_token = add_bos_token
        self._max_length = max_length or resolve_max_length(model.config, self.tokenizer, default=2048)
        self._max_gen_toks = max_gen_toks
        self.vocab_chunk = vocab_chunk
        self.softcap = getattr(self.module.config, "final_logit_softcapping", None)
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )

    # -- lm_eval's model interface ----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context becomes (BOS, else EOS), as ``HFLM``."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template over ``chat_history`` (``--apply_chat_template``)."""
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``, as ``HFLM``: special tokens per ``add_special_tokens``, else
        ``add_bos_token``, else the tokenizer's default; none when ``string`` already starts with BOS."""
        kw: dict[str, Any] = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        return list(self.tokenizer.encode(string, **kw))

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per ``(key, context_enc, continuation_enc)``;
        sequences longer than ``max_length + 1`` lose tokens on the left (as ``HFLM``)."""
        rows = []
        for key, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError(f"empty context or continuation tokens for request {key!r}")
            if len(cont) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(cont)} tokens exceeds max_length={self.max_length}; raise max_length"
                )
            full = (ctx + cont)[-(self.max_length + 1) :]
            rows.append((full, len(cont)))
        scores = self.score_windows(rows, disable_tqdm=disable_tqdm)
        for (key, _, _), answer in zip(requests, scores, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return scores

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole string (``Instance.args == (string,)``) from the prefix token,
        in disjoint ``max_length`` windows each with as much context as fits (``HFLM``'s rule)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores, strict=True):
            totals[i] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations of ``Instance.args == (context, gen_kwargs)``, cut at the first string of
        ``gen_kwargs["until"]`` (and the EOS text); ``max_gen_toks`` new tokens at most."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for idx in groups.values():
            gen_kwargs = requests[idx[0]].args[1]
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kw.get("do_sample"):
                raise ValueError(
                    f"{NAME} decodes greedily; the request asks for sampling ({gen_kwargs}); set "
                    f"do_sample=False / temperature=0 (e.g. --gen_kwargs do_sample=False,temperature=0)"
                )
            until = handle_stop_sequences(kw.get("until"), eos=eos_text)
            new = int(kw["max_gen_toks"])
            if new >= self.max_length:
                raise ValueError(f"max_gen_toks={new} must be below max_length={self.max_length}")
            texts = self.generate([requests[i].args[0] for i in idx], new, until)
            for i, text in zip(idx, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]

    # -- the work -------------------------------------------------------------------------------------
    def score_windows(
        self, rows: Sequence[tuple[Sequence[int], int]], disable_tqdm: bool = True
    ) -> list[tuple[float, bool]]:
        """``(summed log-prob, all greedy)`` of the last ``n`` tokens of each ``(tokens, n)`` (tokens at
        most ``max_length + 1``), each predicted from the ones before it."""
        from tqdm import tqdm

        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        res: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        b = self.batch_size
        for start in tqdm(range(0, len(order), b), disable=disable_tqdm, desc="sora-jax loglikelihood"):
            batch = order[start : start + b]
            t = bucket(max(len(rows[i][0]) - 1 for i in batch), self.max_length)
            ids = np.full((b, t), self.pad_token_id, np.int32)
            labels = np.zeros((b, t), np.int32)
            weights = np.zeros((b, t), np.float32)
            for r, i in enumerate(batch):
                toks, n = rows[i]
                ids[r, : len(toks) - 1] = toks[:-1]
                labels[r, : len(toks) - 1] = toks[1:]
                weights[r, len(toks) - 1 - n : len(toks) - 1] = 1.0
            logp, greedy = _score(
                self.module, self.params, self.adapter, jnp.asarray(ids), jnp.asarray(labels), jnp.asarray(weights),
                self.vocab_chunk, self.softcap,
            )
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for r, i in enumerate(batch):
                res[i] = (float(logp[r]), bool(greedy[r]))
        return res

    def generate(self, contexts: Sequence[str], max_gen_toks: int, until: Sequence[str] = ()) -> list[str]:
        """Greedy continuations of ``contexts`` (decoded without special tokens, cut at the first ``until``
        string); each context keeps its last ``max_length - max_gen_toks`` tokens."""
        keep = self.max_length - max_gen_toks
        encoded = [self.tok_encode(c)[-keep:] for c in contexts]
        if any(len(e) == 0 for e in encoded):
            raise ValueError("an empty context encodes to no tokens; give a non-empty prompt (or add_bos_token=True)")
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        out: list[str] = [""] * len(contexts)
        b = self.batch_size
        for start in range(0, len(order), b):
            batch = order[start : start + b]
            p = bucket(max(len(encoded[i]) for i in batch), keep)
            rows = [encoded[i] for i in batch] + [encoded[batch[0]]] * (b - len(batch))
            ids = np.full((b, p), self.pad_token_id, np.int32)
            mask = np.zeros((b, p), np.int32)
            for r, e in enumerate(rows):
                ids[r, p - len(e) :], mask[r, p - len(e) :] = e, 1
            tokens = greedy_generate(
                self.module, self.params, ids, mask, max_new_tokens=max_gen_toks, eos_token_id=self.eot_token_id,
                pad_token_id=self.pad_token_id, adapter=self.adapter,
            )
            for r, i in enumerate(batch):
                row = list(tokens[r])
                if self.eot_token_id in row:
                    row = row[: row.index(self.eot_token_id)]
                out[i] = cut_at_stop(self.tok_decode(row), until)
        return out


def _batch_size(value: Any) -> int:
    """``batch_size`` as ``lm_eval`` passes it (an int, a digit string, ``"auto"``/``"auto:N"``, None)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        if value is not None:
            log.info("%s: batch_size=%s is taken as 8 (no automatic batch size search)", NAME, value)
        return 8
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or (isinstance(value, float) and value != n):
        raise ValueError(f"batch_size must be a positive integer (or 'auto'), got {value!r}")
    return n


# a lazy target (the class is fetched on first use), so that ``python -m sora_jax.harness`` registers the
# same target as ``import sora_jax.harness``
if NAME not in model_registry:
    model_registry.register(NAME, target="sora_jax.harness:SoraJaxLM")


def main() -> None:
    """``lm_eval``'s command line with the ``sora-jax`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
