"""One adapted dense layer, forward and backward, every method side by side (a microscope for bench.py).

For ``x: (N, d_in)`` and a layer ``(d_in, d_out)`` with bias, each variant is a jitted
``grad(sum(tanh(layer(x)) * P))`` with respect to ``x`` and the adapter leaves (the frozen layer: ``x``
only), i.e. what one adapted layer costs inside a training step. Per variant: median, p10 and p90 step
time over interleaved rounds, the minor page faults per step (``getrusage``: XLA:CPU allocates each
step's temporaries afresh, and a fresh page costs a fault and a zero-fill) and the XLA temp bytes.

Usage::

    python experiments/bench_layer.py                               # 4096 x 384 -> 1536, r 16
    python experiments/bench_layer.py --shape 4096,1536,384 --paths fused,unfused
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python experiments/bench_layer.py   # transparent huge pages
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import sora_jax as sj
from experiments import bench, common
from sora_jax.dense import adapted_dense


def variant(method: str | None, fused: bool, params: dict, r: int, r_p: int):
    """``(fn, args)``: the jitted gradient of one layer and its arguments (``method=None``: frozen)."""
    if method is None:
        def loss(ad, x, params, P):
            return jnp.sum(jnp.tanh(x @ params["l"]["kernel"] + params["l"]["bias"]) * P)
        return jax.jit(jax.grad(loss, argnums=1)), {}
    cfg = sj.AdapterConfig(method=method, r=r, lora_alpha=r, rotation_rank=r_p, target_modules=["l"])
    ad = bench.trained_looking(sj.init_adapter(jax.random.key(0), params, cfg))

    def loss(ad, x, params, P):
        y = adapted_dense(ad, fused=fused)(("l",), x, params["l"]["kernel"], params["l"]["bias"])
        return jnp.sum(jnp.tanh(y) * P)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), ad


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4096,384,1536", help="N,d_in,d_out")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--r-p", dest="r_p", type=int, default=1)
    p.add_argument("--methods", default=",".join(bench.METHODS))
    p.add_argument("--paths", default="fused", help="of fused,unfused")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON output")
    args = p.parse_args(argv)
    n, d_in, d_out = (int(v) for v in args.shape.split(","))
    rng = np.random.default_rng(0)
    params = {"l": {"kernel": jnp.asarray(rng.normal(size=(d_in, d_out)) / np.sqrt(d_in), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=d_out), jnp.float32)}}
    x = jnp.asarray(rng.normal(size=(n, d_in)), jnp.float32)
    P = jnp.asarray(rng.normal(size=(n, d_out)), jnp.float32)
    variants = {"frozen": variant(None, True, params, args.r, args.r_p)}
    for m in args.methods.split(","):
        for path in args.paths.split(","):
            variants[f"{m}/{path}"] = variant(m, path == "fused", params, args.r, args.r_p)
    results = {}
    for name, (fn, ad) in variants.items():
        mem = bench.memory_stats(fn.lower(ad, x, params, P).compile())
        jax.block_until_ready(fn(ad, x, params, P))
        results[name] = {"times": [], "faults": [], "temp_mib": None if mem is None else mem["temp"] / 2**20}
    for _ in range(args.rounds):
        for name, (fn, ad) in variants.items():
            jax.block_until_ready(fn(ad, x, params, P))  # warm the allocator for this variant
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            for _ in range(args.steps):
                jax.block_until_ready(fn(ad, x, params, P))
            dt, df = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            results[name]["times"].append(dt / args.steps)
            results[name]["faults"].append(df / args.steps)
    base_ms = float(np.median(results["frozen"]["times"])) * 1e3
    print(f"layer {n} x {d_in} -> {d_out}, r {args.r}, r_p {args.r_p}")
    print(f"{'variant':20s} {'median ms':>9s} {'p10':>7s} {'p90':>7s} {'/frozen':>7s} {'faults':>8s} {'temp MiB':>8s}")
    for name, r in results.items():
        r.update(**common.step_stats(r["times"], unit="ms"), faults_per_step=float(np.median(r["faults"])))
        print(f"{name:20s} {r['median_ms']:9.2f} {r['p10_ms']:7.2f} {r['p90_ms']:7.2f} "
              f"{r['median_ms'] / base_ms:7.2f} {r['faults_per_step']:8.0f} {r['temp_mib'] or 0:8.1f}")
    record = {"shape": [n, d_in, d_out], "r": args.r, "r_p": args.r_p, "versions": common.versions(common.BENCH_PACKAGES),
              "device": common.machine(), "results": results}
    if args.out:
        common.write_json_atomic(Path(args.out), record, indent=1)
    return record


if __name__ == "__main__":
    main()
