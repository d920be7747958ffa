"""Train-step time of a user's own Flax model (linen and NNX), weight path against activation path.

The models are written as each library's documentation writes them (pre-LayerNorm transformer blocks:
``MultiHeadDotProductAttention`` / ``nnx.MultiHeadAttention`` and a two-layer GELU MLP; no sora_jax hooks).
For each framework and method, one jitted train step (``value_and_grad`` w.r.t. the adapter + AdamW,
adapter and optimiser state donated) through

- ``weight``: ``sora_jax.apply_adapter`` on the params (``nnx.split``'s state for NNX), then the model;
- ``activation``: the unchanged params inside ``sora_jax.linen_activation_path(adapter)`` /
  ``sora_jax.nnx_activation_path(model, adapter)`` (the layer that never forms ``dL/dW'``);
- ``frozen``: the frozen model's forward and the backward to its input (no weight gradients), the floor.

Variants are compiled first, then timed in interleaved rounds (median, p10, p90 after
``block_until_ready``). Writes JSON (default ``experiments/results/bench-user-model.json``).

Usage::

    python experiments/bench_user_model.py                      # d 384, 4 blocks, 8 x 128 tokens
    python experiments/bench_user_model.py --quick              # tiny shapes, a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sora_jax as sj
from experiments import common

TARGETS = ["query", "key", "value", "out", "up", "down"]


class LinenBlock(nn.Module):
    d: int
    heads: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(nn.LayerNorm()(x))
        return x + nn.Dense(self.d, name="down")(nn.gelu(nn.Dense(self.hidden, name="up")(nn.LayerNorm()(x))))


class LinenModel(nn.Module):
    d: int
    heads: int
    hidden: int
    layers: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = LinenBlock(self.d, self.heads, self.hidden, name=f"block_{i}")(x)
        return x


class NnxBlock(nnx.Module):
    def __init__(self, d: int, heads: int, hidden: int, rngs: nnx.Rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False, rngs=rngs)
        self.up, self.down = nnx.Linear(d, hidden, rngs=rngs), nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NnxModel(nnx.Module):
    def __init__(self, d: int, heads: int, hidden: int, layers: int, rngs: nnx.Rngs):
        self.blocks = nnx.List([NnxBlock(d, heads, hidden, rngs) for _ in range(layers)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _loss(y: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(y - target))


def _train_step(loss_fn: Callable[[Any], jax.Array], opt: optax.GradientTransformation) -> Callable:
    def step(adapter, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(adapter)
        updates, opt_state = opt.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def build(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """``{variant name: run one step}``, every variant compiled and run once."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch, args.seq, args.d)), jnp.float32)
    target = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    opt = optax.adamw(1e-3)
    variants: dict[str, Callable[[], None]] = {}

    def add(name: str, step: Callable, adapter: Any) -> None:
        state = {"adapter": adapter, "opt": opt.init(adapter)}

        def run() -> None:
            state["adapter"], state["opt"], loss = step(state["adapter"], state["opt"])
            loss.block_until_ready()

        t0 = time.perf_counter()
        run()
        print(f"  compiled {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        variants[name] = run

    def add_frozen(name: str, forward: Callable[[jax.Array], jax.Array]) -> None:
        fb = jax.jit(jax.grad(lambda xx: _loss(forward(xx), target)))
        fb(x).block_until_ready()
        variants[name] = lambda: fb(x).block_until_ready()

    # linen
    lin = LinenModel(args.d, args.heads, args.hidden, args.layers)
    params = lin.init(jax.random.key(0), x)["params"]
    add_frozen("linen/frozen", lambda xx: lin.apply({"params": params}, xx))
    for method in args.methods:
        cfg = sj.AdapterConfig(method=method, r=args.r, lora_alpha=args.r, target_modules=TARGETS)
        adapter = sj.init_adapter(jax.random.key(1), params, cfg)

        def weight_loss(ad):
            return _loss(lin.apply({"params": sj.apply_adapter(params, ad)}, x), target)

        def act_loss(ad):
            with sj.linen_activation_path(ad):
                return _loss(lin.apply({"params": params}, x), target)

        add(f"linen/{method}/weight", _train_step(weight_loss, opt), jax.tree.map(jnp.copy, adapter))
        add(f"linen/{method}/activation", _train_step(act_loss, opt), jax.tree.map(jnp.copy, adapter))

    # NNX
    model = NnxModel(args.d, args.heads, args.hidden, args.layers, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    add_frozen("nnx/frozen", lambda xx: nnx.merge(graphdef, state)(xx))
    for method in args.methods:
        cfg = sj.AdapterConfig(method=method, r=args.r, lora_alpha=args.r, target_modules=TARGETS)
        adapter = sj.init_adapter(jax.random.key(1), state, cfg)

        def nnx_weight_loss(ad):
            return _loss(nnx.merge(graphdef, sj.apply_adapter(state, ad))(x), target)

        def nnx_act_loss(ad):
            m = nnx.merge(graphdef, state)
            with sj.nnx_activation_path(m, ad):
                return _loss(m(x), target)

        add(f"nnx/{method}/weight", _train_step(nnx_weight_loss, opt), jax.tree.map(jnp.copy, adapter))
        add(f"nnx/{method}/activation", _train_step(nnx_act_loss, opt), jax.tree.map(jnp.copy, adapter))
    return variants


def measure(variants: dict[str, Callable[[], None]], rounds: int) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, t in times.items():
        out[name] = {**common.step_stats(t), "n": len(t)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--methods", default="lora,sora")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny shapes and 2 rounds (a smoke run)")
    p.add_argument("--out", default=None, help="JSON output (default experiments/results/bench-user-model.json)")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if args.quick:
        args.d, args.heads, args.hidden, args.layers, args.batch, args.seq, args.r, args.rounds = 16, 2, 32, 1, 2, 8, 2, 2
    variants = build(args)
    stats = measure(variants, args.rounds)
    for fw in ("linen", "nnx"):
        floor = stats[f"{fw}/frozen"]["median_s"]
        for method in args.methods:
            w, a = stats[f"{fw}/{method}/weight"], stats[f"{fw}/{method}/activation"]
            w["/frozen"], a["/frozen"] = w["median_s"] / floor, a["median_s"] / floor
            a["weight/activation"] = w["median_s"] / a["median_s"]
    print(f"\n{'variant':28s} {'median s':>9s} {'p10':>7s} {'p90':>7s} {'/frozen':>8s} {'weight/act':>10s}")
    for name, st in stats.items():
        print(f"{name:28s} {st['median_s']:9.4f} {st['p10_s']:7.4f} {st['p90_s']:7.4f} "
              f"{st.get('/frozen', 1.0):8.2f} {st.get('weight/activation', float('nan')):10.2f}")
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "tokens_per_step": args.batch * args.seq,
        "results": stats,
        "versions": common.versions(("jax",)),
        "devices": common.devices(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    out = Path(args.out) if args.out else common.ROOT / "experiments" / "results" / "bench-user-model.json"
    common.write_json_atomic(out, report, indent=1)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
