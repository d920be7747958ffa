"""Sharding: a data x model mesh gives the losses of one device; arrays are placed as configured.

The multi-device checks run in a subprocess whose ``XLA_FLAGS`` ask for 8 host CPU devices before
JAX is imported (this process's JAX is already initialised with one device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from sora_jax.sharding import kernel_axis, make_mesh, parse_mesh

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, transformers
    from sora_jax import AdapterConfig
    from sora_jax.models import bert
    from sora_jax.sharding import make_mesh
    from sora_jax.train import TrainConfig, Trainer

    assert jax.device_count() == 8, jax.devices()
    # num_labels=3: the classifier kernel (32, 3) cannot be split along d_out=3 -> split along d_in
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    module = bert.build(cfg)
    params = module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]

    def apply(params, *, dense_fn=None, deterministic=True, rngs=None, **batch):
        m = module if dense_fn is None else module.clone(dense_fn=dense_fn)
        return m.apply({"params": params}, **batch, deterministic=deterministic, rngs=rngs)

    r = np.random.default_rng(0)
    batches = []
    for _ in range(20):
        mask = np.ones((8, 12), np.int32); mask[::3, 8:] = 0
        batches.append(dict(input_ids=(r.integers(1, 100, (8, 12)) * mask).astype(np.int32), attention_mask=mask,
                            token_type_ids=np.zeros_like(mask), labels=r.integers(0, 3, 8),
                            weights=np.ones(8, np.float32)))
    targets = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
    out = {}
    for method, shard in (("lora", True), ("sora", True), ("sora", False)):
        ac = AdapterConfig(method=method, r=4, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"])
        res = {}
        for mesh in (None, "data=4,model=2"):
            if mesh is None and not shard:
                res[mesh] = out[f"{method}-True"]["losses"][0]
                continue
            trainer = Trainer(apply, params, num_labels=3, total_steps=20, adapter_config=ac,
                              config=TrainConfig(lr=5e-3, dropout=True), mesh=make_mesh(mesh), shard_adapter=shard)
            state = trainer.init_state(0)
            losses = []
            for b in batches:
                state, loss = trainer.train_step(state, b)
                losses.append(float(loss))
            res[mesh] = losses
        specs = {p: {k: str(v.sharding.spec) for k, v in lv.items()} for p, lv in state.trainable["adapter"].layers.items()}
        q = "bert/encoder/layer_0/attention/self/query"
        mu = state.opt_state[1].inner_states["body"].inner_state[0].mu  # chain(clip, multi_transform)
        out[f"{method}-{shard}"] = {
            "losses": [res[None], res["data=4,model=2"]],
            "specs": specs,
            "mu_spec": {k: str(v.sharding.spec) for k, v in mu["adapter"].layers[q].items()},
            "head_kernel": str(state.trainable["head"]["classifier"]["kernel"].sharding.spec),
            "frozen_query": str(trainer.frozen["bert"]["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"].sharding.spec),
            "frozen_query_bias": str(trainer.frozen["bert"]["encoder"]["layer_0"]["attention"]["self"]["query"]["bias"].sharding.spec),
            "embedding": str(trainer.frozen["bert"]["embeddings"]["word_embeddings"]["embedding"].sharding.spec),
            "num_shards_B": len(state.trainable["adapter"].layers[q]["B"].addressable_shards),
            "B_shard_shape": list(state.trainable["adapter"].layers[q]["B"].addressable_shards[0].data.shape),
        }
    json.dump(out, sys.stdout)
    """
)


@pytest.fixture(scope="module")
def sharded_run() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("method", ["lora", "sora"])
def test_mesh_losses_equal_single_device(sharded_run: dict, method: str):
    """20 steps (model dropout on) on a data=4 x model=2 mesh give the one-device losses to 1e-5: the
    same math, only float32 reductions split differently (observed differences ~1e-7)."""
    single, meshed = sharded_run[f"{method}-True"]["losses"]
    assert len(single) == 20
    assert max(abs(a - b) for a, b in zip(single, meshed, strict=True)) < 1e-5
    # replicated adapter factors: the same losses too
    if method == "sora":
        _, replicated = sharded_run["sora-False"]["losses"]
        assert max(abs(a - b) for a, b in zip(single, replicated, strict=True)) < 1e-5


def test_adapter_leaves_sharded_as_configured(sharded_run: dict):
    sora = sharded_run["sora-True"]
    q = "bert/encoder/layer_0/attention/self/query"
    # base kernel (32, 32) split along d_out: B, d, C, D along their d_out axis, A replicated
    assert sora["frozen_query"] == str(P(None, "model"))
    assert sora["frozen_query_bias"] == str(P("model"))
    assert sora["embedding"] == str(P())
    assert sora["specs"][q] == {
        "A": str(P()),
        "B": str(P(None, "model")),
        "d": str(P("model")),
        "C": str(P("model", None)),
        "D": str(P("model", None)),
    }
    assert sora["num_shards_B"] == 8 and sora["B_shard_shape"] == [4, 16]  # (r, d_out / 2) per device
    # optimizer moments follow their parameter
    assert sora["mu_spec"] == sora["specs"][q]
    # classifier (32, 3): 3 is not divisible by 2, so split along d_in
    assert sora["head_kernel"] == str(P("model", None))
    lora = sharded_run["lora-True"]["specs"][q]
    assert lora == {"A": str(P()), "B": str(P(None, "model"))}
    # shard_adapter=False: every adapter leaf replicated
    for leaves in sharded_run["sora-False"]["specs"].values():
        assert set(leaves.values()) == {str(P())}


def test_kernel_axis_rule():
    assert kernel_axis((32, 64), 2) == "out"
    assert kernel_axis((32, 3), 2) == "in"
    assert kernel_axis((5, 3), 2) is None
    assert kernel_axis((32, 64), 1) is None
    assert kernel_axis((4, 32, 64), 4) == "out"  # stacked kernels: the last two axes


def test_mesh_spec_errors():
    assert parse_mesh("data=4,model=2") == {"data": 4, "model": 2}
    assert parse_mesh(None) == {} and make_mesh(None) is None
    with pytest.raises(ValueError, match="unknown axis 'pipe'; axes are data, model"):
        parse_mesh("data=2,pipe=2")
    with pytest.raises(ValueError, match="is not name=size"):
        parse_mesh("data4")
    with pytest.raises(ValueError, match="must be a positive integer, got 'x'"):
        parse_mesh("model=x")
    n = jax.device_count()
    with pytest.raises(ValueError, match=rf"needs {2 * n} devices but only {n}.*xla_force_host_platform_device_count"):
        make_mesh(f"data={2 * n}")
    mesh = make_mesh(f"data={n}")
    assert dict(mesh.shape) == {"data": n, "model": 1}


def test_batch_must_split_over_data_axis():
    import numpy as np

    from sora_jax.sharding import shard_batch

    mesh = make_mesh("data=1")
    out = shard_batch({"x": np.zeros((6, 2))}, mesh)
    assert out["x"].sharding.spec == P("data", None)
    with pytest.raises(
        ValueError, match=r"batch size 6 \('x'\) is not a multiple of the mesh's data axis \(1\) times grad_accum \(4\)"
    ):
        shard_batch({"x": np.zeros((6, 2))}, mesh, multiple=4)
