"""Training checkpoints with ``orbax.checkpoint`` (classic ``CheckpointManager``).

A checkpoint directory holds ``run_config.json`` (the run's configuration and its fingerprint)
and one orbax step directory per saved step, each with two items:

- ``state``: the :class:`sora_jax.train.TrainState` (step, trainable leaves, optimizer state, RNG
  key data), saved with ``StandardSave``;
- ``meta``: JSON, the data position (``epoch`` and ``batch_index`` of the next batch), the metrics
  history, the running epoch loss and the config fingerprint.

Orbax writes each step into a temporary directory and renames it when complete, so a killed
process never leaves a half-written checkpoint behind; only the last ``keep`` steps are kept.

Opening a directory that already holds checkpoints requires ``resume=True`` and the same run
configuration (its fingerprint); otherwise :class:`CheckpointError` / :class:`ConfigMismatchError`
is raised before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

RUN_CONFIG = "run_config.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory cannot be used as asked."""


class ConfigMismatchError(CheckpointError):
    """Resuming from checkpoints written by a run with another configuration."""


def fingerprint(run_config: Mapping[str, Any]) -> str:
    """SHA-256 (hex, 16 characters) of the canonical JSON of ``run_config``."""
    text = json.dumps(run_config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _canonical(run_config: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(run_config, sort_keys=True, default=str))


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys if old.get(k) != new.get(k)]


class Checkpointer:
    """Save and restore training state every few steps, keeping the last ``keep``.

    Args:
      directory: where checkpoints go (created if missing).
      run_config: a JSON-able description of everything that determines the training trajectory
        (model, data, method, hyper-parameters, seed). Its fingerprint guards ``resume``.
      keep: how many of the most recent checkpoints to keep.
      resume: allow opening a directory that already holds checkpoints (of the same config).

    Raises:
      CheckpointError: the directory holds checkpoints and ``resume`` is False.
      ConfigMismatchError: ``resume`` with checkpoints of another config (differences listed).
    """

    def __init__(
        self, directory: str | os.PathLike, run_config: Mapping[str, Any], keep: int = 3, resume: bool = False
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self.run_config = _canonical(run_config)
        self.fingerprint = fingerprint(self.run_config)
        existing = self._existing_steps()
        cfg_file = self.directory / RUN_CONFIG
        if existing:
            if not resume:
                raise CheckpointError(
                    f"{self.directory} already holds checkpoints (steps {existing}); pass resume=True "
                    f"(--resume) to continue that run, or use another output directory (or --overwrite)"
                )
            stored = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            if stored.get("fingerprint") != self.fingerprint:
                diff = _diff(stored.get("config", {}), self.run_config)
                raise ConfigMismatchError(
                    f"cannot resume: the checkpoints in {self.directory} were written by a run with another "
                    f"configuration (fingerprint {stored.get('fingerprint')} != {self.fingerprint}); differences: "
                    f"{'; '.join(diff) or 'run_config.json is missing'}. Resume with the original settings, or "
                    f"start a new run in another output directory. Nothing was changed."
                )
        self.directory.mkdir(parents=True, exist_ok=True)
        if not existing:
            _write_json_atomic(cfg_file, {"fingerprint": self.fingerprint, "config": self.run_config})
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def _existing_steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Save ``state`` (a pytree of arrays) and ``meta`` (JSON-able) as step ``step``."""
        meta = {**meta, "fingerprint": self.fingerprint}
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` of ``step`` (default: the latest). ``target``: a state of the same
        structure (arrays or ``jax.ShapeDtypeStruct``; their shardings are used)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint to restore in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        meta = dict(restored["meta"])
        if meta.get("fingerprint") != self.fingerprint:
            raise ConfigMismatchError(
                f"checkpoint step {step} in {self.directory} has config fingerprint {meta.get('fingerprint')}, "
                f"this run has {self.fingerprint}; resume with the original settings"
            )
        state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored["state"]))
        return state, meta

    def close(self) -> None:
        self._manager.close()
