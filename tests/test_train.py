"""The training library: optimizer, loss, gradient accumulation, execution paths, fit, checkpoints.

Tiny random BERTs (hidden 32, 2 layers, vocabulary 100) built directly from ``sora_jax.models.bert``.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sora_jax import AdapterConfig
from sora_jax.checkpoint import Checkpointer, CheckpointError, ConfigMismatchError
from sora_jax.models import bert
from sora_jax.train import (
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    combine,
    fit,
    loss_sums,
    make_optimizer,
    make_train_step,
    split_trainable,
)

TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def tiny_model(num_labels: int = 2, dropout: float = 0.0, seed: int = 0):
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    module = bert.build(cfg)
    params = module.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]

    def apply(params, *, dense_fn=None, deterministic=True, rngs=None, **batch):
        m = module if dense_fn is None else module.clone(dense_fn=dense_fn)
        return m.apply({"params": params}, **batch, deterministic=deterministic, rngs=rngs)

    return apply, params


def make_batches(n: int, bs: int = 8, T: int = 10, num_labels: int = 2, seed: int = 0) -> list[dict]:
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.ones((bs, T), np.int32)
        mask[::2, T - 4 :] = 0
        ids = r.integers(1, 100, (bs, T)).astype(np.int32) * mask
        labels = r.integers(0, num_labels, bs) if num_labels > 1 else r.normal(size=bs).astype(np.float32)
        weights = np.ones(bs, np.float32)
        weights[-1] = 0.0  # a padding row
        out.append(
            dict(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(mask), labels=labels, weights=weights)
        )
    return out


def adapter_config(method: str) -> AdapterConfig:
    return AdapterConfig(method=method, r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["classifier"])


def leaves_np(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# -- optimizer and loss against torch -----------------------------------------------------------------
def test_adamw_two_learning_rates_and_schedule_match_torch():
    """Our optax AdamW (two lrs, bias not decayed, warm-up + linear decay) against torch.optim.AdamW
    with transformers' get_linear_schedule_with_warmup, same grads for 10 steps. Both float32; the
    tolerance 2e-6 covers a different order of float32 operations over 10 updates of size ~lr."""
    rng = np.random.default_rng(0)
    tree = {
        "adapter": {"dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))}},
        "head": {"classifier": {"kernel": rng.normal(size=(4, 2)), "bias": rng.normal(size=(2,))}},
    }
    tree = jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
    lr, head_lr, total = 1e-2, 3e-2, 10
    cfg = TrainConfig(lr=lr, head_lr=head_lr, warmup_ratio=0.2)
    tx = make_optimizer(cfg, total)
    params = jax.tree.map(jnp.asarray, tree)
    state = tx.init(params)

    tp = {
        k: torch.tensor(v, requires_grad=True)
        for k, v in {
            "ak": tree["adapter"]["dense"]["kernel"],
            "ab": tree["adapter"]["dense"]["bias"],
            "hk": tree["head"]["classifier"]["kernel"],
            "hb": tree["head"]["classifier"]["bias"],
        }.items()
    }
    groups = [
        {"params": [tp["ak"]], "lr": lr, "weight_decay": 0.01},
        {"params": [tp["ab"]], "lr": lr, "weight_decay": 0.0},
        {"params": [tp["hk"]], "lr": head_lr, "weight_decay": 0.01},
        {"params": [tp["hb"]], "lr": head_lr, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    sched = transformers.get_linear_schedule_with_warmup(opt, math.ceil(0.2 * total), total)
    for _ in range(total):
        grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), tree)
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for name, g in zip(
            ("ak", "ab", "hk", "hb"),
            (
                grads["adapter"]["dense"]["kernel"],
                grads["adapter"]["dense"]["bias"],
                grads["head"]["classifier"]["kernel"],
                grads["head"]["classifier"]["bias"],
            ),
            strict=True,
        ):
            tp[name].grad = torch.tensor(g)
        opt.step()
        sched.step()
        ours = [
            params["adapter"]["dense"]["kernel"],
            params["adapter"]["dense"]["bias"],
            params["head"]["classifier"]["kernel"],
            params["head"]["classifier"]["bias"],
        ]
        for a, name in zip(ours, ("ak", "ab", "hk", "hb"), strict=True):
            np.testing.assert_allclose(np.asarray(a), tp[name].detach().numpy(), atol=2e-6, rtol=0)
    # the schedule ended at 0 and the parameters moved
    assert sched.get_last_lr()[0] == 0.0
    assert not np.allclose(np.asarray(params["head"]["classifier"]["kernel"]), tree["head"]["classifier"]["kernel"])


def test_loss_sums_match_torch():
    """Weighted cross-entropy and squared error against torch in float64 (tolerance: float32 rounding)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 6)
    weights = np.array([1, 1, 0, 1, 0.5, 1], np.float32)
    lsum, wsum = loss_sums(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits, dtype=torch.float64), torch.tensor(labels), reduction="none"
    )
    np.testing.assert_allclose(float(lsum), float((ref.numpy() * weights).sum()), rtol=1e-6)
    assert float(wsum) == pytest.approx(4.5)
    # regression; a NaN label in a padding row (weight 0) contributes exactly 0
    y = np.array([0.5, np.nan, 2.0], np.float32)
    w = np.array([1, 0, 1], np.float32)
    pred = np.array([[1.0], [3.0], [1.5]], np.float32)
    lsum, wsum = loss_sums(jnp.asarray(pred), jnp.asarray(y), jnp.asarray(w))
    assert float(lsum) == pytest.approx(0.25 + 0.25) and float(wsum) == 2.0


def test_split_and_combine_roundtrip():
    _, params = tiny_model()
    frozen, head = split_trainable(params, ["classifier"])
    assert set(head) == {"classifier"} and "classifier" not in frozen
    assert "pooler" in frozen["bert"]  # the pooler stays frozen (docs/spec.md section 5)
    back = combine(frozen, head)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="present in two trees"):
        combine(params, head)


# -- the trainer ------------------------------------------------------------------------------------------
def run_steps(trainer: Trainer, batches: list[dict], seed: int = 0):
    state = trainer.init_state(seed)
    losses = []
    for b in batches:
        state, loss = trainer.train_step(state, b)
        losses.append(float(loss))
    return state, np.array(losses)


def test_gradient_accumulation_equals_whole_batch():
    """grad_accum=2 sums the weighted micro-batch gradients and divides by the summed weight: the same
    update as the whole batch. Tolerance 1e-5: float32 sums in another order, through Adam."""
    apply, params = tiny_model()
    batches = make_batches(3)
    kw = dict(num_labels=2, total_steps=3, adapter_config=adapter_config("lora"))
    s1, l1 = run_steps(Trainer(apply, params, config=TrainConfig(lr=1e-2, dropout=False), **kw), batches)
    s2, l2 = run_steps(Trainer(apply, params, config=TrainConfig(lr=1e-2, dropout=False, grad_accum=2), **kw), batches)
    np.testing.assert_allclose(l1, l2, atol=1e-5)
    for a, b in zip(leaves_np(s1.trainable), leaves_np(s2.trainable), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        Trainer(apply, params, config=TrainConfig(grad_accum=3), **kw).put_batch(batches[0])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_activation_and_weight_paths_train_alike(fused):
    """SORA trained through adapted_dense (activations; both forms of the layer, whatever the tiny shape
    would choose) and through apply_adapter (weights): the same losses and parameters (to 1e-5: the two
    paths agree to float32 rounding, docs/spec.md section 2)."""
    apply, params = tiny_model()
    batches = make_batches(1) * 3  # one batch thrice: its loss must fall
    kw = dict(num_labels=2, total_steps=3, adapter_config=adapter_config("sora"))
    cfg = TrainConfig(lr=1e-2, dropout=False, path="activation", fused=fused)
    s1, l1 = run_steps(Trainer(apply, params, config=cfg, **kw), batches)
    s2, l2 = run_steps(Trainer(apply, params, config=TrainConfig(lr=1e-2, dropout=False, path="weight"), **kw), batches)
    np.testing.assert_allclose(l1, l2, atol=1e-5)
    for a, b in zip(leaves_np(s1.trainable), leaves_np(s2.trainable), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # only the adapter and the head are trained; the pretrained params are untouched
    assert set(s1.trainable) == {"adapter", "head"}
    head0 = np.asarray(params["classifier"]["kernel"])
    assert not np.allclose(np.asarray(s1.trainable["head"]["classifier"]["kernel"]), head0)
    B = np.asarray(s1.trainable["adapter"].layers["bert/encoder/layer_0/attention/self/query"]["B"])
    assert np.abs(B).max() > 0  # B starts at 0
    assert l1[-1] < l1[0]


def test_full_finetuning_trains_every_parameter():
    apply, params = tiny_model()
    batches = make_batches(2)
    trainer = Trainer(apply, params, num_labels=2, total_steps=2, config=TrainConfig(lr=1e-2, dropout=False))
    state, _ = run_steps(trainer, batches)
    assert set(state.trainable) == {"base", "head"}
    trained = trainer.params(state)
    assert jax.tree.structure(trained) == jax.tree.structure(params)
    changed = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(params), strict=True)
    ]
    assert all(changed)
    assert trainer.count_parameters(state)["percent"] == 100.0


def test_pure_train_step_without_trainer_matches_trainer():
    """make_train_step's functions, jitted by hand with no Trainer, give the Trainer's losses, parameters and
    logits bit for bit (the Trainer is a facade over them); dropout on, so the keys must agree too."""
    apply, params = tiny_model(dropout=0.1)
    batches = make_batches(3)
    cfg, ac = TrainConfig(lr=1e-2, grad_accum=2), adapter_config("dora")
    trainer = Trainer(apply, params, num_labels=2, total_steps=3, adapter_config=ac, config=cfg)
    s1, l1 = run_steps(trainer, batches)

    ts = make_train_step(apply, total_steps=3, adapter_config=ac, config=cfg)
    frozen, head = split_trainable(params, ac.modules_to_save)
    key = jax.random.key(0)
    state = ts.init(ts.init_trainable(key, frozen, head), key)
    step = jax.jit(ts.step, donate_argnums=0)
    l2 = []
    for b in batches:
        state, loss = step(state, frozen, {k: jnp.asarray(v) for k, v in b.items()})
        l2.append(float(loss))
    np.testing.assert_array_equal(l1, np.array(l2))
    for a, b in zip(leaves_np(s1.trainable), leaves_np(state.trainable), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 3 and l2[-1] != l2[0]
    logits = np.asarray(jax.jit(ts.eval)(state.trainable, frozen, {k: jnp.asarray(v) for k, v in batches[0].items()}))
    np.testing.assert_array_equal(logits, trainer.predict(s1, batches[0]))
    assert logits.shape == (8, 2)


# -- fit: resume, NaN, config mismatch -----------------------------------------------------------------------
def _eval_fn(trainer):
    ev = make_batches(2, seed=9)

    def evaluate(state):
        correct = sum(
            int(((trainer.predict(state, b).argmax(-1) == b["labels"]) * (b["weights"] > 0)).sum()) for b in ev
        )
        logit_sum = sum(float(trainer.predict(state, b).sum()) for b in ev)
        return {"accuracy": correct / 14, "logit_sum": logit_sum}

    return evaluate


def test_resume_after_kill_matches_uninterrupted_run(tmp_path: Path):
    """A run stopped after 7 of 10 steps (checkpoints at 3, 5 = epoch end, 6) and resumed from step 6
    (mid-epoch: data position epoch 2, batch 2) ends with bit-identical trainable params and metrics.
    Model dropout is on, so the restored RNG and step counter matter."""
    apply, params = tiny_model(dropout=0.1)
    data = {e: make_batches(5, seed=100 + e) for e in range(2)}
    kw = dict(num_labels=2, total_steps=10, adapter_config=adapter_config("lora"), config=TrainConfig(lr=5e-3))
    run_cfg = {"lr": 5e-3, "method": "lora"}

    trainer = Trainer(apply, params, **kw)
    ref = fit(trainer, trainer.init_state(0), train_batches=data.__getitem__, epochs=2, evaluate=_eval_fn(trainer))
    assert ref.finished and ref.step == 10

    ck = Checkpointer(tmp_path / "ck", run_cfg, keep=2)
    killed = fit(
        trainer,
        trainer.init_state(0),
        train_batches=data.__getitem__,
        epochs=2,
        evaluate=_eval_fn(trainer),
        checkpointer=ck,
        save_every=3,
        max_steps=7,
    )
    assert not killed.finished and killed.step == 7
    assert ck.all_steps() == [5, 6]  # keep=2 of 3, 5, 6
    ck.close()

    trainer2 = Trainer(apply, params, **kw)  # a new process would build everything afresh
    ck2 = Checkpointer(tmp_path / "ck", run_cfg, keep=2, resume=True)
    resumed = fit(
        trainer2,
        trainer2.init_state(0),
        train_batches=data.__getitem__,
        epochs=2,
        evaluate=_eval_fn(trainer2),
        checkpointer=ck2,
        save_every=3,
        resume=True,
    )
    assert resumed.finished and resumed.resumed_from == 6 and resumed.step == 10
    for a, b in zip(leaves_np(ref.state.trainable), leaves_np(resumed.state.trainable), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(leaves_np(ref.state.opt_state), leaves_np(resumed.state.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.history == ref.history
    assert len(resumed.step_times) + len(resumed.compile_times) == 4  # only steps 7..10 ran again
    ck2.close()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path):
    apply, params = tiny_model(num_labels=1)
    batches = make_batches(6, num_labels=1)
    batches[4]["labels"][0] = np.nan  # step 5 sees a NaN target in a real row
    trainer = Trainer(
        apply,
        params,
        num_labels=1,
        total_steps=6,
        adapter_config=adapter_config("prediag"),
        config=TrainConfig(lr=1e-3, dropout=False),
    )
    ck = Checkpointer(tmp_path / "ck", {"x": 1}, keep=3)
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan at step 5 \(epoch 1, batch 5/6\).*last good checkpoint \(step 4\)"
    ):
        fit(trainer, trainer.init_state(0), train_batches=lambda e: batches, epochs=1, checkpointer=ck, save_every=2)
    assert ck.all_steps() == [2, 4]
    state, meta = ck.restore(trainer.init_state(0))
    assert int(state.step) == 4 and meta["batch_index"] == 4 and meta["epoch"] == 0
    assert all(np.isfinite(x).all() for x in leaves_np(state.trainable))
    # the restored step-4 state equals a clean run's state after 4 steps
    clean, _ = run_steps(trainer, batches[:4])
    for a, b in zip(leaves_np(clean.trainable), leaves_np(state.trainable), strict=True):
        np.testing.assert_array_equal(a, b)


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_checkpoint_directory_guards(tmp_path: Path):
    ck = Checkpointer(tmp_path / "ck", {"lr": 0.001, "seed": 0})
    ck.save(1, {"w": jnp.ones(3)}, {"epoch": 0})
    ck.close()
    before = _snapshot(tmp_path / "ck")
    with pytest.raises(ConfigMismatchError, match=r"another configuration.*lr: 0\.001 -> 0\.002.*Nothing was changed"):
        Checkpointer(tmp_path / "ck", {"lr": 0.002, "seed": 0}, resume=True)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(steps \[1\]\).*--resume"):
        Checkpointer(tmp_path / "ck", {"lr": 0.001, "seed": 0})
    assert _snapshot(tmp_path / "ck") == before
    # the same config resumes fine
    ok = Checkpointer(tmp_path / "ck", {"lr": 0.001, "seed": 0}, resume=True)
    state, meta = ok.restore({"w": jnp.zeros(3)})
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(3))
    assert meta["epoch"] == 0
