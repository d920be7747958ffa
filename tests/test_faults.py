"""Faults during training: a non-finite state, optimizer settings changed on resume, damaged checkpoints.

Tiny random BERTs from ``test_train`` (hidden 32, 2 layers); checkpoints in ``tmp_path``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.checkpoint import Checkpointer, CheckpointError, CheckpointWarning, ConfigMismatchError
from sora_jax.train import NonFiniteLossError, TrainConfig, Trainer, fit
from tests.test_train import adapter_config, leaves_np, make_batches, tiny_model


def _run_config(lr: float, clip: float | None) -> dict:
    return {"method": "prediag", "lr": lr, "max_grad_norm": clip, "train": {"lr": lr, "max_grad_norm": clip}}


CHANGES = {"lr": lambda o, n: n < o, "train.lr": lambda o, n: n < o,
           "max_grad_norm": lambda o, n: n is not None, "train.max_grad_norm": lambda o, n: n is not None}


def test_diverging_run_checkpoints_only_finite_states_and_its_advice_works(tmp_path: Path):
    """``lr = 1e4``, a checkpoint every step: the state overflows a step or more before the loss does, so a
    checkpoint of a non-finite state used to be written and named "last good". Now every saved step is finite
    and the error names the newest one. The advice works: resuming with a lower learning rate and/or a
    gradient-norm clip is accepted as a recorded change (the optimizer state has the same structure with and
    without the clip), and, from a checkpoint before the divergence (step 1: the warm-up's first learning
    rate is 0), trains to the end with finite numbers. A higher learning rate is refused."""
    batches = make_batches(6)

    def trainer(lr: float, clip: float | None) -> Trainer:
        apply, params = tiny_model()
        cfg = TrainConfig(lr=lr, head_lr=lr, dropout=False, max_grad_norm=clip, warmup_ratio=0.3)
        return Trainer(apply, params, num_labels=2, total_steps=6, adapter_config=adapter_config("prediag"),
                       config=cfg)

    t = trainer(1e4, None)
    ck = Checkpointer(tmp_path / "ck", _run_config(1e4, None), keep=10)
    with pytest.raises(NonFiniteLossError, match=r"last good checkpoint \(step (\d+)\).*finite.*--resume") as exc:
        fit(t, t.init_state(0), train_batches=lambda e: batches, epochs=1, checkpointer=ck, save_every=1)
    ck.close()
    steps = Checkpointer(tmp_path / "ck", _run_config(1e4, None), resume=True).all_steps()
    assert steps[0] == 1 and f"(step {steps[-1]})" in str(exc.value)
    for s in steps:  # every checkpoint holds finite numbers
        state, _ = Checkpointer(tmp_path / "ck", _run_config(1e4, None), resume=True).restore(t.init_state(0), s)
        assert all(np.isfinite(x).all() for x in leaves_np((state.trainable, state.opt_state))), s

    for lr, clip in ((1e-3, None), (1e-3, 1.0), (1e4, 1.0)):
        d = tmp_path / f"resume-{lr}-{clip}"
        shutil.copytree(tmp_path / "ck", d)
        with pytest.raises(ConfigMismatchError, match="max_grad_norm" if lr == 1e4 else "lr"):
            Checkpointer(d, _run_config(lr, clip), resume=True)  # not declared changeable: refused as before
        ck2 = Checkpointer(d, _run_config(lr, clip), resume=True, changeable=CHANGES)
        record = json.loads((d / "run_config.json").read_text())
        assert record["changes"][-1]["step"] == steps[-1]
        changed = record["changes"][-1]["changed"]
        assert ("lr" in changed) == (lr != 1e4) and ("max_grad_norm" in changed) == (clip is not None)
        t2 = trainer(lr, clip)
        state, meta = ck2.restore(t2.init_state(0))  # the optimizer state restores into the new settings' structure
        assert meta["step"] == steps[-1]
        if lr == 1e4:
            continue
        for s in steps[1:]:  # resume from before the divergence
            shutil.rmtree(d / str(s))
        ck2 = Checkpointer(d, _run_config(lr, clip), resume=True, changeable=CHANGES)
        res = fit(t2, t2.init_state(0), train_batches=lambda e: batches, epochs=1, checkpointer=ck2, save_every=1,
                  resume=True)
        assert res.finished and res.resumed_from == 1 and res.step == 6
        assert all(np.isfinite(x).all() for x in leaves_np(res.state.trainable))
        ck2.close()
    # a higher learning rate is not an allowed change
    with pytest.raises(ConfigMismatchError, match=r"lr: 10000\.0 -> 20000\.0"):
        Checkpointer(tmp_path / "ck", _run_config(2e4, None), resume=True, changeable=CHANGES)


def _saved(tmp_path: Path) -> tuple[Checkpointer, dict, dict]:
    ck = Checkpointer(tmp_path / "ck", {"x": 1}, keep=5)
    # random (incompressible) values, large enough for their own data file: a flipped byte there decompresses
    # fine and used to be restored silently
    states = {s: {"w": jax.random.normal(jax.random.key(s), (20000,)), "m": {"v": jnp.full((16, 16), float(s))}}
              for s in (1, 2, 3)}
    for s, st in states.items():
        ck.save(s, st, {"step": s})
    ck.wait()
    ck.close()
    return ck, states, {"w": jnp.zeros(20000), "m": {"v": jnp.zeros((16, 16))}}


def test_checkpoint_of_another_state_structure_is_not_called_damaged(tmp_path: Path):
    """A step written with another state layout (an older version's optimizer state, say) under the same
    configuration is one clear error naming the cause and the fix; it is neither set aside nor skipped."""
    _, _, _ = _saved(tmp_path)
    other = {"w": jnp.zeros(20000), "m": [jnp.zeros((16, 16))]}  # a list where the checkpoint has a dict
    ck = Checkpointer(tmp_path / "ck", {"x": 1}, keep=5, resume=True)
    with pytest.raises(ConfigMismatchError, match=r"another structure .* older sora-jax.*--overwrite"):
        ck.restore(other)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name[0].isdigit()) == ["1", "2", "3"]
    assert not list((tmp_path / "ck").glob("damaged-*"))


def _array_files(step_dir: Path) -> list[Path]:
    """The files of the saved array data (orbax/TensorStore chunks in ``d/`` folders), largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d" and "ocdbt" in str(p)]
    assert files, sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*"))
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _flip(path: Path, n: int = 64) -> None:
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + n] = bytes(b ^ 0xFF for b in raw[mid : mid + n])
    path.write_bytes(bytes(raw))


def _truncate_json(step_dir: Path) -> None:
    f = step_dir / "meta" / "metadata"
    f.write_text(f.read_text()[:10])


def _truncate_arrays(step_dir: Path) -> None:
    for f in _array_files(step_dir)[:1]:
        f.write_bytes(f.read_bytes()[:20])


def _delete_manifest(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.name in ("manifest.ocdbt", "_METADATA"):
            f.unlink()


def _empty(step_dir: Path) -> None:
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.mark.parametrize("damage", ["flip", "truncate_json", "truncate_arrays", "manifest", "empty"])
def test_damaged_newest_checkpoint_falls_back_to_intact_step(tmp_path: Path, damage: str):
    """Each kind of damage to the newest step (64 bytes flipped inside the array data, a truncated JSON, truncated
    array data, deleted metadata files, an empty step directory) is detected, named, set aside, and the newest
    intact step is restored with a warning; corrupted numbers are never returned."""
    _, states, target = _saved(tmp_path)
    step3 = tmp_path / "ck" / "3"
    if damage == "flip":
        _flip(_array_files(step3)[0])
    else:
        {"truncate_json": _truncate_json, "truncate_arrays": _truncate_arrays, "manifest": _delete_manifest,
         "empty": _empty}[damage](step3)
    ck = Checkpointer(tmp_path / "ck", {"x": 1}, keep=5, resume=True)
    with pytest.warns(CheckpointWarning, match=r"step 3: .*restored the newest intact step, 2"):
        state, meta = ck.restore(target)
    assert meta["step"] == 2 and ck.damaged and ck.damaged[0].startswith("step 3:")
    for a, b in zip(leaves_np(state), leaves_np(states[2]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "ck" / "damaged-3").is_dir() and not step3.exists()
    # training goes on: step 3 can be saved again
    ck.save(3, states[3], {"step": 3})
    ck.wait()
    state, meta = ck.restore(target)
    assert meta["step"] == 3
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(states[3]["w"]))


def test_no_intact_checkpoint_is_a_clear_refusal(tmp_path: Path):
    _saved(tmp_path)
    for s in (1, 2, 3):
        _truncate_json(tmp_path / "ck" / str(s))
    ck = Checkpointer(tmp_path / "ck", {"x": 1}, keep=5, resume=True)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*step 3: .*step 2: .*step 1: .*new output"):
        ck.restore({"w": jnp.zeros(20000), "m": {"v": jnp.zeros((16, 16))}})
