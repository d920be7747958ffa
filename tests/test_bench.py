"""The benchmark harness (experiments/bench.py) and the equivalence of the two execution paths it times.

- A smoke test runs ``bench.py --quick --peft`` on a tiny random BERT in a subprocess and checks the
  JSON report's keys and that every timed variant produced steps.
- The activation path (``sora_jax.adapted_dense``, with its hand-written backward) and the weight
  path (``sora_jax.apply_adapter`` then the plain model, plain autodiff) must give the same loss and
  the same gradients, w.r.t. the adapter and w.r.t. the frozen parameters, for every method.
  Tolerance: both are float32 computations of the same function with different summation orders
  through a 2-layer model; differences are ~1e-7 relative, so we allow 1e-5 on the loss and
  2e-4 relative (plus 2e-5 of the largest entry) on gradients, while a wrong term shows up at >= 1e-2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_fixtures import save, torch_model

import sora_jax as sj
from sora_jax.hub import load_pretrained
from sora_jax.train import loss_sums

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "experiments" / "bench.py"
TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random BERT (hidden 32, 1 layer: every adapted module kind once, fast to compile)."""
    return save(torch_model("bert", num_hidden_layers=1), tmp_path_factory.mktemp("tiny_bert"))


def test_bench_quick_smoke(tiny_dir, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--model", str(tiny_dir), "--batch", "2", "--seq", "8", "--quick", "--peft",
           "--methods", "lora,sora", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("command", "model", "batch", "seq", "versions", "device", "gpu", "threads", "matmul_ceiling_gflops",
                "flops", "results", "ratios", "acceptance", "memory_note"):
        assert key in report, key
    assert report["batch"] == 2 and report["seq"] == 8
    assert report["versions"]["jax"] and report["versions"]["torch"]
    if jax.default_backend() == "cpu":
        assert report["gpu"] is None
    assert report["threads"]["torch"]["num_threads"] == report["threads"]["cpu_count"]
    res = report["results"]
    want = ["jax/train/frozen_backprop", "jax/train/full", "torch/train/frozen_backprop", "torch/train/peft_lora",
            "torch/train/torch_sora", "torch/infer/peft_lora", "jax/infer/frozen", "torch/infer/frozen",
            "jax/matmul/2048x2048x2048", "torch/matmul/4096x384x1536"]
    for m in ("lora", "sora"):
        want += [f"jax/train/{m}/activation", f"jax/train/{m}/weight", f"jax/infer/{m}/activation",
                 f"jax/infer/{m}/weight", f"jax/infer/{m}/merged"]
    for name in want:
        assert name in res, name
        assert res[name]["n"] == 2 and res[name]["median_s"] > 0, name
    assert "torch/train/torch_prediag" not in res and "torch/train/peft_dora" not in res  # not asked for
    mem = res["jax/train/lora/activation"]["memory"]
    assert mem["peak"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] > 0
    # the FLOP floors: adapters cost more than the frozen-backprop step, the weight path more than activations
    fl = report["flops"]
    assert fl["frozen_backprop"] < fl["lora/activation"] < fl["lora/weight"] < fl["full"] + fl["lora/weight"]
    ratios = report["ratios"]["jax/train/sora/activation"]
    assert {"vs_frozen_backprop", "flop_floor_vs_frozen_backprop", "vs_lora", "vs_torch"} <= set(ratios)
    assert any(c["check"] == "LoRA / frozen-backprop" for c in report["acceptance"])


def test_bench_dropout_variants(tiny_dir, tmp_path):
    """``--dropout`` trains with the model's dropout (the steps' losses differ from deterministic ones only
    through the masks, so this checks that the variants exist and ran); ``--jax-masks`` adds the same step
    with JAX's own masks; ``--jax-masks`` alone is refused."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--model", str(tiny_dir), "--batch", "2", "--seq", "8", "--quick", "--dropout",
           "--jax-masks", "--methods", "lora", "--paths", "activation", "--no-full", "--no-infer", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dropout"] is True and report["jax_masks"] is True
    for name in ("jax/train/frozen_backprop", "jax/train/lora/activation", "jax/train/lora/activation/jax-masks"):
        assert report["results"][name]["n"] == 2, name
    bad = subprocess.run([c for c in cmd if c != "--dropout"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "--jax-masks compares dropout masks: add --dropout" in bad.stderr


def test_bench_layer_smoke(tmp_path):
    """The one-layer microscope runs every requested variant and records times, faults and memory."""
    out = tmp_path / "layer.json"
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_layer.py"), "--shape", "64,16,24", "--r", "4",
           "--methods", "lora,sora", "--paths", "fused,unfused", "--rounds", "2", "--steps", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"frozen", "lora/fused", "lora/unfused", "sora/fused", "sora/unfused"}
    for r in res.values():
        assert len(r["times"]) == 2 and r["median_ms"] > 0 and r["faults_per_step"] >= 0 and r["temp_mib"] >= 0
    assert "sora/fused" in proc.stdout


def test_bench_decoder_quick(tmp_path):
    """The causal-LM benchmark on a tiny random LLaMA: every variant timed, and its own checks hold.

    Tolerances: merged and unmerged logits are float32 computations of one function (2e-6 of the largest
    logit, while the adapter itself moves them by ~1e-2 of it); sora-jax and transformers on the same
    weights agree to float32 rounding (1e-4, as tests/test_llama.py); the chunked loss's temporaries are
    ``O(tokens x chunk)`` (chunk 256 at both sizes: within 10 %), the plain loss's grow with the vocabulary
    (8x the vocabulary: more than 4x the bytes).
    """
    out = tmp_path / "decoder.json"
    cmd = [sys.executable, str(BENCH), "--synthetic", "llama-tiny", "--layers", "1", "--batch", "2", "--seq", "16",
           "--quick", "--peft", "--methods", "lora,sora", "--ce-vocabs", "512,4096", "--vocab-chunk", "256",
           "--prompt-len", "8", "--new-tokens", "8", "--out", str(out)]
    # about a minute alone on 2 cores (compiling 5 tiny programs and loading torch); generous for a shared machine
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("command", "kind", "model_shape", "batch", "seq", "targets", "generation_shape", "versions", "threads",
                "flops", "results", "ratios", "generation", "agreement", "cross_entropy_memory", "acceptance"):
        assert key in report, key
    assert report["kind"] == "decoder" and report["batch"] == 2 and report["seq"] == 16
    assert report["targets"] == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert report["model_shape"]["layers"] == 1 and report["model_shape"]["vocab"] == 512
    assert report["threads"]["torch"]["num_threads"] == report["threads"]["cpu_count"]
    res = report["results"]
    want = ["jax/train/frozen_backprop", "torch/train/frozen_backprop", "torch/train/peft_lora", "torch/train/torch_sora"]
    for kind in ("prefill", "generate"):
        want += [f"jax/{kind}/frozen", f"torch/{kind}/frozen", f"torch/{kind}/peft_lora", f"torch/{kind}/torch_sora"]
    for m in ("lora", "sora"):
        want += [f"jax/train/{m}/activation", f"jax/prefill/{m}/activation", f"jax/prefill/{m}/merged",
                 f"jax/generate/{m}/activation", f"jax/generate/{m}/merged"]
    for name in want:
        assert name in res, name
        assert res[name]["n"] == 2 and res[name]["median_s"] > 0, name
    assert not any("dora" in n or "prediag" in n for n in res)  # not asked for
    for m in ("frozen_backprop", "lora/activation", "sora/activation"):
        st = res[f"jax/train/{m}"]
        mem = st["memory"]
        assert st["compile_s"] > 0 and mem["peak"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] > 0
    fl = report["flops"]
    assert fl["frozen_backprop"] < fl["lora/activation"] < fl["sora/activation"]
    gen = report["generation"]
    assert set(gen) == {"jax/frozen", "torch/frozen", "torch/peft_lora", "torch/torch_sora", "jax/lora/activation",
                        "jax/lora/merged", "jax/sora/activation", "jax/sora/merged"}
    for row in gen.values():
        assert row["prefill_s"] > 0 and row["prefill_tokens_per_s"] > 0 and row["generate_s"] > 0
        assert "decode_s_per_step" in row
    agree = report["agreement"]
    for m in ("lora", "sora"):
        a = agree["merged_vs_unmerged_logits"][m]
        assert a["max_abs_diff"] <= 2e-6 * a["max_abs_logit"], (m, a)
        assert a["adapter_moves_logits"] > 1e-3 * a["max_abs_logit"], (m, a)  # the comparison is not vacuous
        assert a["token_agreement"] == 1.0, m
    assert agree["jax_tokens_shape"] == [2, 8]
    assert agree["jax_vs_torch_logits_max_abs_diff"] <= 1e-4 * max(1.0, agree["max_abs_logit"])
    assert agree["jax_vs_torch_token_agreement"] == 1.0
    ce = report["cross_entropy_memory"]
    small, large = ce["512"], ce["4096"]
    assert small["chunk"] == large["chunk"] == 256
    assert large["chunked_temp_mib"] <= 1.1 * small["chunked_temp_mib"]
    assert large["plain_temp_mib"] > 4 * small["plain_temp_mib"] and large["plain_temp_mib"] >= large["logits_mib"]
    checks = {c["check"]: c for c in report["acceptance"]}
    assert checks["chunked CE temp, vocab 4096 / 512"]["pass"] is True
    for name in ("decode step unmerged sora / merged", "decode step sora-jax / transformers generate",
                 "paper: torch decode step unmerged sora / DoRA", "peak memory sora / frozen-backprop"):
        assert name in checks, name
    assert "== generation" in proc.stdout and "== token cross-entropy" in proc.stdout


def test_bench_decoder_arguments(capsys):
    """Causal LMs default to 8 x 256 on the activation path; encoders keep 32 x 128; a one-token generation
    cannot give a decode step."""
    from experiments import bench

    args = bench.parse_args(["--model", "smollm2"])
    assert (args.batch, args.seq, args.paths) == (8, 256, "activation")
    args = bench.parse_args(["--synthetic", "gemma", "--batch", "4", "--seq", "128"])
    assert (args.batch, args.seq) == (4, 128) and bench._decoder().is_decoder(args)
    args = bench.parse_args([])
    assert (args.batch, args.seq, args.paths) == (32, 128, "activation,weight")
    assert not bench._decoder().is_decoder(args)
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "smollm2", "--new-tokens", "1"])
    assert "--new-tokens must be >= 2" in capsys.readouterr().err


def test_matmul_ceiling_without_timed_matmuls():
    """``--rounds 0`` (compile only) times nothing: the ceiling is None, not a KeyError."""
    from experiments import bench

    results = {
        "jax/matmul/a": {"kind": "matmul", "framework": "jax", "n": 0},
        "jax/matmul/b": {"kind": "matmul", "framework": "jax", "n": 3, "achieved_gflops": 40.0},
        "torch/matmul/a": {"kind": "matmul", "framework": "torch", "n": 0},
        "jax/train/lora": {"kind": "train", "framework": "jax", "n": 3, "achieved_gflops": 90.0},
    }
    assert bench.matmul_ceiling(results) == {"jax": 40.0, "torch": None}


def test_bench_rejects_unknown_method(capsys):
    from experiments import bench

    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "lora,bogus"])
    assert "unknown method 'bogus'" in capsys.readouterr().err


def _perturbed(adapter: sj.Adapter) -> sj.Adapter:
    """Every leaf moved off its initial value (B != 0, d != 1, C != D, m != colnorm(W))."""
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(("method", "rotation"), [(m, "taylor") for m in sj.METHODS] + [("sora", "cayley")])
def test_activation_and_weight_paths_agree(tiny_dir, method, rotation, fused):
    """Both forms of the activation path's layer (``adapted_dense(..., fused=...)``: the effective weight
    formed for the input gradient and, where possible, the forward; or every term on activations)."""
    model = load_pretrained(str(tiny_dir), load_tokenizer=False)
    cfg = sj.AdapterConfig(method=method, r=4, lora_alpha=8, rotation_rank=2, rotation=rotation, target_modules=TARGETS)
    adapter = _perturbed(sj.init_adapter(jax.random.key(0), model.params, cfg))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 99, (3, 9)), jnp.int32)
    mask = jnp.asarray(np.array([[1] * 9, [1] * 5 + [0] * 4, [1] * 7 + [0] * 2]), jnp.int32)
    labels, weights = jnp.asarray([0, 2, 1]), jnp.ones(3)

    def loss(ad, params, path):
        if path == "activation":
            logits = model.apply(params, dense_fn=sj.adapted_dense(ad, fused=fused), input_ids=ids, attention_mask=mask)["logits"]
        else:
            logits = model.apply(sj.apply_adapter(params, ad), input_ids=ids, attention_mask=mask)["logits"]
        lsum, wsum = loss_sums(logits, labels, weights)
        return lsum / wsum

    # eager (no jit): a tiny model runs faster op by op than it compiles
    results = {p: jax.value_and_grad(loss, argnums=(0, 1))(adapter, model.params, p)
               for p in ("activation", "weight")}
    (la, (ga, gpa)), (lw, (gw, gpw)) = results["activation"], results["weight"]
    np.testing.assert_allclose(float(la), float(lw), rtol=1e-5)
    flat_a = jax.tree_util.tree_flatten_with_path((ga, gpa))[0]
    flat_w = jax.tree_util.tree_flatten_with_path((gw, gpw))[0]
    assert len(flat_a) == len(flat_w)
    # absolute slack relative to the largest gradient of the same tree: some gradients are exactly 0 in
    # exact arithmetic (a key bias under softmax) and both paths return rounding noise there
    scale = {i: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(t)) for i, t in enumerate((gw, gpw))}
    for (path, a), (_, w) in zip(flat_a, flat_w, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=2e-4, atol=2e-5 * scale[path[0].idx],
                                   err_msg=jax.tree_util.keystr(path))
    # the comparison is not vacuous: adapter gradients are non-zero on every leaf kind
    for leaves in ga.layers.values():
        for name, g in leaves.items():
            assert float(jnp.abs(g).max()) > 0, name
