"""The decoder half of ``experiments/bench.py``: a causal LM's training step and its generation.

``bench.py`` hands over here for a causal LM (``--model smollm2`` / ``gemma3-270m``, ``--synthetic llama`` /
``gemma`` and their ``-tiny`` forms, or ``--causal-lm`` with a model directory). For one model, batch and
sequence length it measures, on the paper's decoder targets (``q_proj, k_proj, v_proj, up_proj, down_proj``):

- **training** (``jax/train/...``): the frozen-backprop step (gradient down to the embedding output, no
  parameter gradients) and each method's train step (:class:`sora_jax.train.Trainer`, value_and_grad +
  AdamW), both with the token cross-entropy of :func:`sora_jax.lm.causal_lm_loss` (the vocabulary
  projection chunked, never ``(tokens, vocab)`` logits at once); with ``--peft`` the PyTorch peers on the
  same weights (``transformers``' ``...ForCausalLM``): frozen-backprop, PEFT LoRA and DoRA, Pre-Diag and
  SORA wrappers (``bench.TorchConditionedLinear``), each with the full-vocabulary cross-entropy that
  ``transformers`` computes. Compile time and the XLA compiled memory analysis per JAX variant.
- **the cross-entropy's memory**: XLA's temporary bytes of the loss and its gradient w.r.t. the hidden
  states, chunked (:func:`sora_jax.lm.chunked_cross_entropy`) and plain (``log_softmax`` of the whole
  logits), at two vocabulary sizes (``--ce-vocabs``) and the run's ``tokens x hidden``.
- **generation** (``jax/prefill/...``, ``jax/generate/...``): :func:`sora_jax.generate.greedy_generate` of a
  batch of random prompts (``--gen-batch x --prompt-len``, no padding, no early stop), the base model, each
  method unmerged (adapter on activations, ``adapter=``) and merged (``sora_jax.merge``); with ``--peft``
  ``transformers``' ``generate`` (greedy, KV cache) of the base model and of the unmerged torch methods.
  ``prefill`` generates one token, ``generate`` ``--new-tokens``; per decoded token: their difference /
  (new tokens - 1). Checks recorded beside the times: merged and unmerged logits of the prompts agree, and
  the greedy tokens of sora-jax and ``transformers`` agree on the base model.

Every variant is compiled (or called once) first, then all are measured in alternating rounds
(``bench.measure``). torch runs with as many threads as XLA:CPU uses (the CPUs of this process).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sora_jax as sj
from experiments import bench, common
from sora_jax import lm
from sora_jax.config import PAPER_DECODER_TARGETS
from sora_jax.generate import greedy_generate

DECODER_ALIASES = ("smollm2", "gemma3-270m")
SYNTHETIC = ("llama", "gemma", "llama-tiny", "gemma-tiny")
# the torch peers of generation (unmerged) and the sora-jax method each one runs
TORCH_GEN = {"peft_lora": "lora", "peft_dora": "dora", "torch_prediag": "prediag", "torch_sora": "sora"}


def is_decoder(args: argparse.Namespace) -> bool:
    """Whether ``bench.py``'s arguments name a causal LM."""
    return bool(args.causal_lm or args.synthetic in SYNTHETIC or (not args.synthetic and args.model in DECODER_ALIASES))


# -- configuration --------------------------------------------------------------------------------------
def synthetic_config(name: str, layers: int | None, vocab: int | None) -> Any:
    """A ``transformers`` causal-LM config of a stated shape (random weights are drawn for it).

    ``llama``: SmolLM2-135M's shape (30 x 576, FFN 1536, 9 heads / 3 KV heads of 64, vocab 49152, tied).
    ``gemma``: Gemma 3 270M's shape (18 x 640, FFN 2048, 4 heads / 1 KV head of 256, vocab 262144, tied,
    sliding window 512 on 5 of every 6 layers).
    ``llama-tiny`` / ``gemma-tiny``: 2 x 64, FFN 128, 4 heads / 2 KV heads of 16, vocab 512 (tests).
    ``layers`` and ``vocab`` override the number of layers and the vocabulary size.
    """
    import transformers

    tiny = name.endswith("-tiny")
    if name.startswith("llama"):
        shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=512) if tiny else
                 dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, vocab_size=49152))
        if layers is not None:
            shape["num_hidden_layers"] = layers
        if vocab is not None:
            shape["vocab_size"] = vocab
        return transformers.LlamaConfig(**shape, max_position_embeddings=8192, rms_norm_eps=1e-5,
                                        tie_word_embeddings=True, pad_token_id=0,
                                        rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    if name.startswith("gemma"):
        shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=512, query_pre_attn_scalar=16,
                      sliding_window=8) if tiny else
                 dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=256, vocab_size=262144, query_pre_attn_scalar=256,
                      sliding_window=512))
        if layers is not None:
            shape["num_hidden_layers"] = layers
        if vocab is not None:
            shape["vocab_size"] = vocab
        n = shape["num_hidden_layers"]
        types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
        return transformers.Gemma3TextConfig(**shape, layer_types=types, max_position_embeddings=32768,
                                             tie_word_embeddings=True, pad_token_id=0)
    raise ValueError(f"unknown decoder --synthetic {name!r}; choose from {', '.join(SYNTHETIC)}")


def token_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids ``(batch, seq)`` (no padding), the next token as each position's label (a random
    one after the last), unit weights."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(1000, vocab // 2), vocab, (batch, seq + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "attention_mask": np.ones((batch, seq), np.int32),
            "labels": ids[:, 1:].copy(), "weights": np.ones((batch, seq), np.float32)}


def load_setup(args: argparse.Namespace, workdir: Path, need_hf_dir: bool) -> bench.Setup:
    """The causal LM (``task="causal_lm"``), its ``transformers`` directory for the torch peers (a
    synthetic model's own; a GGUF model's written with :func:`sora_jax.export.export_merged`), the batch."""
    from sora_jax.export import export_merged

    if args.synthetic:
        cfg = synthetic_config(args.synthetic, args.layers, args.vocab)
        name = args.synthetic + (f"-{args.layers}l" if args.layers is not None else "")
        name += f"-v{args.vocab}" if args.vocab is not None else ""
        model_dir = bench.save_random_model(cfg, workdir / name, auto_class="AutoModelForCausalLM")
        model = sj.load_pretrained(str(model_dir), task="causal_lm", load_tokenizer=False,
                                   scan_layers=args.scan_layers)
    else:
        model = sj.load_pretrained(args.model, task="causal_lm", load_tokenizer=False, scan_layers=args.scan_layers)
        name = Path(args.model).name if os.path.isdir(args.model) else Path(args.model).stem
        model_dir = model.path
        if need_hf_dir and not (model_dir / "config.json").is_file():
            model_dir = export_merged(model, model.params, None, workdir / "hf")
    name += "-scan" if args.scan_layers else ""
    targets = tuple(args.targets.split(",")) if args.targets else PAPER_DECODER_TARGETS
    softcap = getattr(model.module.config, "final_logit_softcapping", None)
    batch = token_batch(int(model.config.vocab_size), args.batch, args.seq)
    return bench.Setup(name, model, Path(model_dir), model.config.model_type, batch, targets, (), args.r,
                       float(args.alpha), args.r_p, loss_fn=lm.causal_lm_loss(args.vocab_chunk, softcap))


def decoder_flops(setup: bench.Setup) -> dict[str, float]:
    """``bench.flop_counts`` plus the vocabulary projection, which the dense layers do not hold for a tied
    model: ``2 N H V`` forward, ``6 N H V`` per train step (forward, its recomputation in the chunked
    loss's backward, the input gradient)."""
    flops = bench.flop_counts(setup)
    c = setup.model.config
    n = int(np.prod(setup.batch["input_ids"].shape))
    head = 2.0 * n * c.hidden_size * c.vocab_size
    tied = "lm_head" not in setup.model.params  # an lm_head is counted by flop_counts (4 N H V per step)
    return {k: v + (0.0 if k.startswith("infer/") else (3.0 if tied else 1.0) * head) for k, v in flops.items()}


# -- the cross-entropy's memory ---------------------------------------------------------------------------
def cross_entropy_memory(n: int, hidden: int, vocabs: list[int], chunk: int) -> dict[str, dict[str, Any]]:
    """XLA's compiled memory of the token loss and its gradient w.r.t. ``hidden (n, H)`` (the output
    kernel ``(H, V)`` frozen), chunked and plain, per vocabulary size. ``temp`` is what the loss adds
    beyond its arguments (hidden states, kernel, labels) and its outputs."""
    out: dict[str, dict[str, Any]] = {}
    for v in vocabs:
        h = jax.ShapeDtypeStruct((n, hidden), jnp.float32)
        w = jax.ShapeDtypeStruct((hidden, v), jnp.float32)
        labels = jax.ShapeDtypeStruct((n,), jnp.int32)
        weights = jax.ShapeDtypeStruct((n,), jnp.float32)

        def chunked(h, w, labels, weights):
            lsum, wsum = lm.chunked_cross_entropy(h, w, labels, weights, chunk)
            return lsum / wsum

        def plain(h, w, labels, weights):
            logp = jax.nn.log_softmax(h @ w, axis=-1)
            per = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
            return jnp.sum(per * weights) / jnp.sum(weights)

        row: dict[str, Any] = {"tokens": n, "hidden": hidden, "vocab": v, "chunk": min(chunk, v),
                               "logits_mib": n * v * 4 / 2**20}
        for kind, fn in (("chunked", chunked), ("plain", plain)):
            compiled = jax.jit(jax.value_and_grad(fn)).lower(h, w, labels, weights).compile()
            mem = bench.memory_stats(compiled)
            row[f"{kind}_temp_mib"] = None if mem is None else mem["temp"] / 2**20
        out[str(v)] = row
    return out


# -- generation -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Generation:
    """The prompts and what each generation variant produced last (for the agreement checks)."""

    ids: np.ndarray
    mask: np.ndarray
    new_tokens: int
    tokens: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def prompts(vocab: int, batch: int, length: int, seed: int = 1) -> Generation:
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(1000, vocab // 2), vocab, (batch, length)).astype(np.int32)
    return Generation(ids, np.ones_like(ids), 0)


def jax_generation_variants(setup: bench.Setup, gen: Generation, methods: list[str],
                            log: Callable[[str], None]) -> tuple[list[bench.Variant], dict[str, Any]]:
    """Prefill (1 new token) and generation (``gen.new_tokens``) of the base model and of each method
    unmerged and merged; returns the variants and the merged-vs-unmerged logit agreement per method."""
    model, params = setup.model, setup.model.params
    ids, mask = jnp.asarray(gen.ids), jnp.asarray(gen.mask)

    def variant(name: str, p: Any, adapter: Any) -> list[bench.Variant]:
        out = []
        for kind, n in (("prefill", 1), ("generate", gen.new_tokens)):
            def run(p=p, n=n, key=f"jax/{kind}/{name}") -> None:
                gen.tokens[key] = greedy_generate(model.module, p, gen.ids, gen.mask, max_new_tokens=n,
                                                  eos_token_id=None, pad_token_id=0, adapter=adapter)
            t0 = time.perf_counter()
            run()  # compiles (a merged model reuses the base model's executable)
            v = bench.Variant(f"jax/{kind}/{name}", "jax", kind, run, compile_s=time.perf_counter() - t0)
            out.append(v)
        log(f"  generation {name}: first calls {out[0].compile_s:.1f} s, {out[1].compile_s:.1f} s")
        return out

    variants = variant("frozen", params, None)
    logits = jax.jit(lambda p: model.apply(p, input_ids=ids, attention_mask=mask)["logits"])
    base_logits = np.asarray(logits(params))
    agree: dict[str, Any] = {}
    for m in methods:
        adapter = bench.trained_looking(sj.init_adapter(jax.random.key(0), params, setup.adapter_config(m)))
        merged = jax.block_until_ready(sj.merge(params, adapter))
        variants += variant(f"{m}/activation", params, adapter)
        variants += variant(f"{m}/merged", merged, None)
        unmerged_logits = np.asarray(model.apply(params, input_ids=ids, attention_mask=mask,
                                                 dense_fn=sj.adapted_dense(adapter))["logits"])
        merged_logits = np.asarray(logits(merged))
        scale = float(np.abs(merged_logits).max())
        agree[m] = {"max_abs_diff": float(np.abs(unmerged_logits - merged_logits).max()), "max_abs_logit": scale,
                    "adapter_moves_logits": float(np.abs(merged_logits - base_logits).max())}
    return variants, agree


class TorchDecoderPeer(bench.TorchPeer):
    """``bench.TorchPeer`` for a causal LM, with ``transformers``' ``generate`` (greedy, KV cache)."""

    def generation_variants(self, gen: Generation, methods: list[str]) -> list[bench.Variant]:
        torch = self.torch
        ids, mask = torch.from_numpy(gen.ids.astype(np.int64)), torch.from_numpy(gen.mask.astype(np.int64))
        out = []
        peers = [None] + [tm for tm, jm in TORCH_GEN.items() if jm in methods]
        for method in peers:
            model = self.load() if method is None else self.adapted(method)
            model.eval()
            gc = model.generation_config
            gc.eos_token_id, gc.pad_token_id, gc.do_sample = None, 0, False  # greedy, never stop early
            for kind, n in (("prefill", 1), ("generate", gen.new_tokens)):
                key = f"torch/{kind}/{method or 'frozen'}"

                def run(model=model, n=n, key=key) -> None:
                    with torch.inference_mode():
                        res = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                             min_new_tokens=n, do_sample=False)
                    gen.tokens[key] = res[:, ids.shape[1]:].numpy()

                out.append(bench.Variant(key, "torch", kind, run))
        return out

    def logits(self, gen: Generation) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.load()(input_ids=torch.from_numpy(gen.ids.astype(np.int64)),
                              attention_mask=torch.from_numpy(gen.mask.astype(np.int64))).logits
        return out.float().numpy()


def generation_summary(results: dict[str, dict], gen: Generation) -> dict[str, dict[str, Any]]:
    """Per generation variant: prefill seconds and tokens/s, decode seconds per step and tokens/s
    (``(generate - prefill) / (new tokens - 1)``, from the medians)."""
    b, p = gen.ids.shape
    out: dict[str, dict[str, Any]] = {}
    for name, st in results.items():
        fw, kind, *rest = name.split("/")
        if kind != "prefill" or "median_s" not in st:
            continue
        g = results.get(f"{fw}/generate/{'/'.join(rest)}")
        row: dict[str, Any] = {"prefill_s": st["median_s"], "prefill_tokens_per_s": b * p / st["median_s"],
                               "generate_s": None if not g else g.get("median_s")}
        if g and "median_s" in g and gen.new_tokens > 1:
            step = (g["median_s"] - st["median_s"]) / (gen.new_tokens - 1)
            row["decode_s_per_step"] = step
            row["decode_tokens_per_s"] = b / step if step > 0 else None
        out[f"{fw}/{'/'.join(rest)}"] = row
    return out


# -- acceptance ------------------------------------------------------------------------------------------
def acceptance(results: dict[str, dict], ratios: dict[str, dict], generation: dict[str, dict],
               ce: dict[str, dict], methods: list[str]) -> list[dict[str, Any]]:
    """The decoder targets (activation path), checked on these medians; ``target`` None: recorded, no
    threshold (the paper's inference claim)."""
    def med(name: str) -> dict | None:
        return results.get(name)

    def mem(name: str) -> float | None:
        a, b = (results.get(name) or {}).get("memory"), (results.get("jax/train/frozen_backprop") or {}).get("memory")
        return a["peak"] / b["peak"] if a and b else None

    def step(name: str) -> float | None:
        return (generation.get(name) or {}).get("decode_s_per_step")

    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    checks: list[tuple[str, float | None, float | None]] = []
    checks.append(("LoRA / frozen-backprop", ratios.get("jax/train/lora/activation", {}).get("vs_frozen_backprop"),
                   1.15))
    for m in ("dora", "prediag", "sora"):
        if m in methods:
            checks.append((f"{m} / LoRA", ratios.get(f"jax/train/{m}/activation", {}).get("vs_lora"), 1.05))
    for m in methods:
        checks.append((f"sora-jax {m} / PEFT LoRA", bench.ratio(med(f"jax/train/{m}/activation"),
                                                               med("torch/train/peft_lora")), 1.0))
    for m in methods:
        checks.append((f"peak memory {m} / frozen-backprop", mem(f"jax/train/{m}/activation"), 1.10))
    if "sora" in methods:
        checks.append(("SORA train-step compile s", (med("jax/train/sora/activation") or {}).get("compile_s"), 15.0))
    vs = sorted(ce.values(), key=lambda r: r["vocab"])
    if len(vs) >= 2 and vs[0].get("chunked_temp_mib"):
        checks.append((f"chunked CE temp, vocab {vs[-1]['vocab']} / {vs[0]['vocab']}",
                       vs[-1]["chunked_temp_mib"] / vs[0]["chunked_temp_mib"], 1.05))
    for m in methods:
        checks.append((f"decode step unmerged {m} / merged", div(step(f"jax/{m}/activation"), step(f"jax/{m}/merged")),
                       1.05))
    for m in methods:
        checks.append((f"decode step merged {m} / base", div(step(f"jax/{m}/merged"), step("jax/frozen")), 1.02))
    checks.append(("decode step sora-jax / transformers generate", div(step("jax/frozen"), step("torch/frozen")), 1.0))
    checks.append(("prefill sora-jax / transformers generate",
                   div((generation.get("jax/frozen") or {}).get("prefill_s"),
                       (generation.get("torch/frozen") or {}).get("prefill_s")), 1.0))
    for fw, dora in (("jax", "jax/dora/activation"), ("torch", "torch/peft_dora")):
        for m, peer in (("prediag", "torch/torch_prediag"), ("sora", "torch/torch_sora")):
            name = f"jax/{m}/activation" if fw == "jax" else peer
            checks.append((f"paper: {fw} decode step unmerged {m} / DoRA", div(step(name), step(dora)), None))
    return [{"check": c, "value": v, "target": t, "pass": None if v is None or t is None else bool(v <= t)}
            for c, v, t in checks]


# -- report ---------------------------------------------------------------------------------------------
def print_report(results: dict[str, dict], ratios: dict[str, dict], flops: dict[str, float],
                 generation: dict[str, dict], ce: dict[str, dict], checks: list[dict[str, Any]],
                 agree: dict[str, Any], out: Callable[[str], None]) -> None:
    bench.print_table({k: v for k, v in results.items() if v["kind"] in ("train", "matmul")}, ratios, flops, [],
                      lambda s: None if s.startswith("\n== acceptance") else out(s))
    if generation:
        out("\n== generation (medians; decode step = (generate - prefill) / (new tokens - 1)) ==")
        out(f"{'variant':28s} {'prefill s':>9s} {'pre tok/s':>9s} {'decode ms':>9s} {'dec tok/s':>9s} "
            f"{'/base':>6s} {'first s':>8s}")
        base = {fw: (generation.get(f"{fw}/frozen") or {}).get("decode_s_per_step") for fw in ("jax", "torch")}
        for name, row in generation.items():
            fw = name.split("/")[0]
            first = (results.get(name.replace("/", "/generate/", 1)) or {}).get("compile_s")
            step = row.get("decode_s_per_step")
            out(f"{name:28s} {bench.fmt(row['prefill_s']):>9s} {bench.fmt(row['prefill_tokens_per_s'], '.0f'):>9s} "
                f"{bench.fmt(None if step is None else 1e3 * step, '.1f'):>9s} "
                f"{bench.fmt(row.get('decode_tokens_per_s'), '.0f'):>9s} "
                f"{bench.fmt(None if step is None or not base[fw] else step / base[fw], '.2f'):>6s} "
                f"{bench.fmt(first, '.1f'):>8s}")
    if agree:
        out("\nmerged vs unmerged prompt logits, max |diff| (max |logit|): " + ", ".join(
            f"{m} {a['max_abs_diff']:.1e} ({a['max_abs_logit']:.1f})" for m, a in agree.items()))
    if ce:
        out("\n== token cross-entropy + gradient, XLA temp MiB ==")
        for row in ce.values():
            out(f"tokens {row['tokens']} x vocab {row['vocab']} (logits {row['logits_mib']:.0f} MiB): "
                f"chunked ({row['chunk']}) {bench.fmt(row['chunked_temp_mib'], '.1f')}, "
                f"plain {bench.fmt(row['plain_temp_mib'], '.1f')}")
    out("\n== acceptance targets ==")
    for c in checks:
        mark = "n/a" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        target = "(recorded)" if c["target"] is None else f"<= {c['target']:.2f}"
        out(f"{c['check']:52s} {bench.fmt(c['value'], '.3f'):>8s} {target:>10s}  {mark}")


def main(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    methods = args.methods.split(",")
    paths = args.paths.split(",")
    threads = len(os.sched_getaffinity(0))

    log = common.log
    gen = None
    agree: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sora_bench_decoder_") as tmp:
        setup = load_setup(args, Path(tmp), need_hf_dir=args.peft)
        c = setup.model.config
        flops = decoder_flops(setup)
        log(f"model {setup.name} ({setup.model_type}, {c.num_hidden_layers} x {c.hidden_size}, vocab {c.vocab_size}), "
            f"batch {args.batch} x {args.seq}, targets {setup.targets}, r {args.r}, r_p {args.r_p}; compiling")
        vocabs = [int(v) for v in args.ce_vocabs.split(",")] if args.ce_vocabs else []
        ce = cross_entropy_memory(args.batch * args.seq, int(c.hidden_size), vocabs, args.vocab_chunk)
        jv: list[bench.Variant] = bench.jax_matmul_variants()
        tv: list[bench.Variant] = []
        peer = TorchDecoderPeer(setup, threads) if args.peft else None
        if not args.no_train:
            jv.append(bench.jax_frozen_backprop_variant(setup, flops["frozen_backprop"]))
            log(f"  compiled frozen_backprop: {jv[-1].compile_s:.1f} s")
            for m in methods:
                for q in paths:
                    jv.append(bench.jax_train_variant(setup, m, q, flops[f"{m}/{q}"]))
                    log(f"  compiled {m}/{q}: {jv[-1].compile_s:.1f} s")
            if peer:
                tv.extend(peer.matmul_variants())
                tv.append(peer.frozen_backprop_variant(flops["frozen_backprop"]))
                for tm, jm in bench.TORCH_METHODS.items():
                    if jm in methods:
                        tv.append(peer.train_variant(tm, flops.get(f"{jm}/activation")))
        if not args.no_generate:
            gen = prompts(int(c.vocab_size), args.gen_batch or args.batch, args.prompt_len)
            gen.new_tokens = args.new_tokens
            gv, agree = jax_generation_variants(setup, gen, methods, log)
            jv.extend(gv)
            if peer:
                tv.extend(peer.generation_variants(gen, methods))
        variants = bench.interleave(jv, tv)
        log(f"{len(variants)} variants; measuring {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up")
        bench.measure(variants, args.warmup, args.rounds, args.steps, log)
        torch_logits = peer.logits(gen) if peer and gen is not None else None

    results = {v.name: v.stats() for v in variants}
    ceiling = bench.matmul_ceiling(results)
    ratios = bench.summarise(results, flops, ceiling)
    generation = generation_summary(results, gen) if gen is not None else {}
    agreement: dict[str, Any] = {"merged_vs_unmerged_logits": agree}
    if gen is not None:
        base = np.asarray(setup.model.apply(setup.model.params, input_ids=jnp.asarray(gen.ids),
                                            attention_mask=jnp.asarray(gen.mask))["logits"])
        jt = gen.tokens.get("jax/generate/frozen")
        agreement["jax_tokens_shape"] = None if jt is None else list(jt.shape)
        if torch_logits is not None:
            agreement["jax_vs_torch_logits_max_abs_diff"] = float(np.abs(base - torch_logits).max())
            agreement["max_abs_logit"] = float(np.abs(base).max())
            tt = gen.tokens.get("torch/generate/frozen")
            if jt is not None and tt is not None:
                agreement["jax_vs_torch_first_token_agreement"] = float(np.mean(jt[:, 0] == tt[:, 0]))
                agreement["jax_vs_torch_token_agreement"] = float(np.mean(jt == tt))
        for m in methods:
            a, b = gen.tokens.get(f"jax/generate/{m}/activation"), gen.tokens.get(f"jax/generate/{m}/merged")
            if a is not None and b is not None:
                agree[m]["token_agreement"] = float(np.mean(a == b))
    checks = acceptance(results, ratios, generation, ce, methods)
    lines: list[str] = []
    print_report(results, ratios, flops, generation, ce, checks, agree, lambda s: (print(s), lines.append(s)))
    report = {
        **bench.run_record(args, argv, threads),
        "kind": "decoder",
        "model": setup.name, "model_type": setup.model_type,
        "model_shape": {"layers": int(c.num_hidden_layers), "hidden": int(c.hidden_size),
                        "intermediate": int(c.intermediate_size), "heads": int(c.num_attention_heads),
                        "kv_heads": int(c.num_key_value_heads), "vocab": int(c.vocab_size),
                        "tied": "lm_head" not in setup.model.params},
        "batch": args.batch, "seq": args.seq, "r": args.r, "lora_alpha": args.alpha, "rotation_rank": args.r_p,
        "targets": list(setup.targets), "methods": methods, "paths": paths, "vocab_chunk": args.vocab_chunk,
        "generation_shape": None if gen is None else {"batch": int(gen.ids.shape[0]), "prompt": int(gen.ids.shape[1]),
                                                      "new_tokens": gen.new_tokens},
        "warmup": args.warmup, "rounds": args.rounds, "steps": args.steps,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "matmul_ceiling_gflops": ceiling, "flops": flops, "results": results, "ratios": ratios,
        "generation": generation, "agreement": agreement, "cross_entropy_memory": ce, "acceptance": checks,
    }
    out = Path(args.out) if args.out else common.ROOT / "experiments" / "results" / f"bench-decoder-{setup.name}.json"
    common.write_json_atomic(out, report, indent=1)
    log(f"wrote {out}")
    return report
