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
is raised before anything is written. The exception: keys named in ``changeable`` (optimizer settings
such as the learning rate or the gradient-norm clip) may differ on resume; the change is recorded in
``run_config.json`` (``changes``: step, old and new values, the fingerprint before) and the fingerprint
then guards the new configuration.

Every saved array has a checksum in ``meta`` (SHA-256 of its dtype, shape and bytes). :meth:`Checkpointer.restore`
verifies them; a step that cannot be read or fails a checksum is reported (:class:`CheckpointWarning`, naming
the step and the reason), moved aside to ``damaged-<step>``, and the newest intact step is restored instead;
when no step is intact, :class:`CheckpointError` says so. Corrupted numbers are never restored silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

RUN_CONFIG = "run_config.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory cannot be used as asked."""


class ConfigMismatchError(CheckpointError):
    """Resuming from checkpoints written by a run with another configuration."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint step was skipped (the newest intact one was restored instead)."""


def checksums(state: Any) -> dict[str, str | None]:
    """``{key path: SHA-256 (hex, 16 characters) of dtype, shape and bytes}`` per array leaf of ``state``;
    ``None`` for an array this process cannot read whole (sharded across hosts)."""
    out: dict[str, str | None] = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            out[jax.tree_util.keystr(kp)] = None
            continue
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out[jax.tree_util.keystr(kp)] = h.hexdigest()[:16]
    return out


def _flat(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": leaf}``."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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


def _differing(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every leaf where the nested configurations differ."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [f"{k}: {o!r} -> {n!r}" for k, (o, n) in _differing(old, new).items()]


class Checkpointer:
    """Save and restore training state every few steps, keeping the last ``keep``.

    Args:
      directory: where checkpoints go (created if missing).
      run_config: a JSON-able description of everything that determines the training trajectory
        (model, data, method, hyper-parameters, seed). Its fingerprint guards ``resume``.
      keep: how many of the most recent checkpoints to keep.
      resume: allow opening a directory that already holds checkpoints (of the same config).
      changeable: dotted keys of ``run_config`` (``"train.lr"``) that may differ on resume: an explicit
        change of optimizer settings, recorded in ``run_config.json``; every other key must match. A mapping
        gives each key a test ``allowed(old, new)`` (e.g. only a lower learning rate).

    Raises:
      CheckpointError: the directory holds checkpoints and ``resume`` is False, or its run_config.json
        cannot be read.
      ConfigMismatchError: ``resume`` with checkpoints of another config (differences listed).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        run_config: Mapping[str, Any],
        keep: int = 3,
        resume: bool = False,
        changeable: Mapping[str, Callable[[Any, Any], bool]] | Sequence[str] = (),
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self.run_config = _canonical(run_config)
        self.fingerprint = fingerprint(self.run_config)
        self.damaged: list[str] = []  # what restore found damaged and skipped
        self._known = {self.fingerprint}  # fingerprints a checkpoint of this run may carry
        existing = self._existing_steps()
        cfg_file = self.directory / RUN_CONFIG
        record = {"fingerprint": self.fingerprint, "config": self.run_config}
        if existing:
            if not resume:
                raise CheckpointError(
                    f"{self.directory} already holds checkpoints (steps {existing}); pass resume=True "
                    f"(--resume) to continue that run, or use another output directory (or --overwrite)"
                )
            try:
                stored = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            except (OSError, ValueError) as e:
                raise CheckpointError(
                    f"cannot resume: {cfg_file} is unreadable ({e}); restore it, or start a new run (--overwrite)"
                ) from None
            changes = list(stored.get("changes", []))
            self._known |= {c.get("fingerprint_before") for c in changes} | {stored.get("fingerprint")}
            if stored.get("fingerprint") != self.fingerprint:
                differing = _differing(stored.get("config", {}), self.run_config)
                allowed = changeable if isinstance(changeable, Mapping) else {k: lambda o, n: True for k in changeable}
                fixed = [k for k, (o, n) in differing.items() if k not in allowed or not allowed[k](o, n)]
                if fixed or not stored:
                    diff = [f"{k}: {o!r} -> {n!r}" for k, (o, n) in differing.items()]
                    raise ConfigMismatchError(
                        f"cannot resume: the checkpoints in {self.directory} were written by a run with another "
                        f"configuration (fingerprint {stored.get('fingerprint')} != {self.fingerprint}); differences: "
                        f"{'; '.join(diff) or 'run_config.json is missing'}. Resume with the original settings, or "
                        f"start a new run in another output directory. Nothing was changed."
                    )
                steps = self._existing_steps()
                changes.append({
                    "step": steps[-1] if steps else None,
                    "changed": {k: [o, n] for k, (o, n) in differing.items()},
                    "fingerprint_before": stored.get("fingerprint"),
                })
                _write_json_atomic(cfg_file, {**record, "changes": changes})
        self.directory.mkdir(parents=True, exist_ok=True)
        if not existing:
            _write_json_atomic(cfg_file, record)
        for stale in self.directory.glob(f".{RUN_CONFIG}.*"):  # an interrupted write of run_config.json
            stale.unlink(missing_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
        )
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
        """Save ``state`` (a pytree of arrays) and ``meta`` (JSON-able) as step ``step``, with a checksum of
        every array (:func:`checksums`)."""
        meta = {**meta, "fingerprint": self.fingerprint, "checksums": checksums(state)}
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` of ``step`` (default: the newest intact step). ``target``: a state of the same
        structure (arrays or ``jax.ShapeDtypeStruct``; their shardings are used).

        Without ``step``, a step that cannot be read or fails its checksums is skipped with a
        :class:`CheckpointWarning` naming it and why, and moved aside to ``damaged-<step>`` (kept for
        inspection, out of the way of the steps that will be saved again); ``self.damaged`` lists them.

        Raises:
          CheckpointError: no checkpoint, or none intact (each step's problem listed); with ``step``, that
            step is damaged.
          ConfigMismatchError: the checkpoint was written by another configuration.
        """
        known = set(self._existing_steps()) | set(self.all_steps())
        steps = [step] if step is not None else sorted(known, reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint to restore in {self.directory}")
        problems: list[str] = []
        for s in steps:
            try:
                state, meta = self._restore_step(target, s)
            except ConfigMismatchError:
                raise
            except Exception as e:  # orbax, TensorStore, JSON and file errors alike: the step is damaged
                reason = " ".join(str(e).split())[:300] or type(e).__name__
                problems.append(f"step {s}: {type(e).__name__}: {reason}")
                continue
            if problems:
                self.damaged = problems
                moved = self._set_aside([int(p.split(":")[0].split()[1]) for p in problems])
                warnings.warn(
                    f"damaged checkpoint(s) in {self.directory} skipped ({'; '.join(problems)}); moved aside to "
                    f"{', '.join(moved)}; restored the newest intact step, {s}",
                    CheckpointWarning,
                    stacklevel=2,
                )
            return state, meta
        if step is not None:
            raise CheckpointError(f"checkpoint {problems[0]} in {self.directory} is damaged")
        raise CheckpointError(
            f"no intact checkpoint in {self.directory}: {'; '.join(problems)}. Nothing was changed; start the run "
            f"again in a new output directory (or with --overwrite, which deletes these checkpoints)"
        )

    def _restore_step(self, target: Any, step: int) -> tuple[Any, dict[str, Any]]:
        # the metadata first: a checkpoint of another configuration is reported as such, not as damaged
        meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        if meta.get("fingerprint") not in self._known:
            raise ConfigMismatchError(
                f"checkpoint step {step} in {self.directory} has config fingerprint {meta.get('fingerprint')}, "
                f"this run has {self.fingerprint}; resume with the original settings"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except ValueError as e:
            if "tree structures do not match" not in str(e):
                raise
            raise ConfigMismatchError(
                f"checkpoint step {step} in {self.directory} holds a training state of another structure than this "
                f"version builds (it was written by an older sora-jax); it cannot be resumed. Nothing was changed; "
                f"start the run again in a new output directory (or with --overwrite, which deletes it)"
            ) from None
        state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored["state"]))
        stored = meta.get("checksums")
        if stored is not None:
            got = checksums(state)
            bad = [k for k, v in got.items() if v is not None and stored.get(k) is not None and stored[k] != v]
            missing = sorted(set(got) - set(stored))
            if bad or missing:
                raise CheckpointError(
                    f"array data fails its checksum ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})"
                    if bad
                    else f"arrays missing from the checksums ({', '.join(missing[:3])})"
                )
        return state, meta

    def _set_aside(self, steps: Sequence[int]) -> list[str]:
        """Rename damaged step directories to ``damaged-<step>[-n]``; reload the manager's step list."""
        moved = []
        for s in steps:
            src = self.directory / str(s)
            if not src.exists():
                continue
            dst, n = self.directory / f"damaged-{s}", 1
            while dst.exists():
                dst, n = self.directory / f"damaged-{s}-{n}", n + 1
            os.replace(src, dst)
            moved.append(dst.name)
        self._manager.reload()
        return moved

    def close(self) -> None:
        self._manager.close()
