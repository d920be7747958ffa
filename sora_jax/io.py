"""Saving and loading an adapter alone: ``adapter_model.safetensors`` + ``adapter_config.json``.

Arrays keep their dtype bit for bit; tensor names are ``<module path>/<leaf>``. Writes are atomic:
files go to a temporary directory beside the target, which then takes its place (an existing target is
swapped out in one step on Linux, so it never goes missing).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
from safetensors.flax import load_file, save_file

from sora_jax.adapter import Adapter
from sora_jax.config import AdapterConfig, AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "sora-jax-adapter"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the
    system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def stale_temporaries(out: Path) -> list[Path]:
    """The temporary directories that an interrupted :func:`atomic_directory` of ``out`` left beside it."""
    if not out.parent.is_dir():
        return []
    return sorted(p for kind in ("tmp", "old") for p in out.parent.glob(f".{out.name}.{kind}-*"))


def atomic_directory(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a fresh temporary directory, then move it to ``out_dir``.

    An existing ``out_dir`` is replaced only after ``write`` succeeded, by swapping the two directories in one
    atomic step where the system can (Linux), so that ``out_dir`` always exists, old or new, and is never half
    written; elsewhere by two renames. If ``write`` raises, ``out_dir`` is untouched and the temporary directory
    is removed. Temporaries left by an earlier, interrupted call are removed first.
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(out):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.is_dir() and not out.is_symlink() and _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old contents
        elif out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_adapter(adapter: Adapter, out_dir: str | os.PathLike) -> Path:
    """Write ``adapter`` to ``out_dir`` (atomically). Returns the directory."""
    tensors = {f"{path}/{name}": jnp.asarray(v) for path, lv in adapter.layers.items() for name, v in lv.items()}
    meta = {"format": FORMAT, "config": adapter.config.to_dict()}

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))

    return atomic_directory(out_dir, write)


def load_adapter(directory: str | os.PathLike) -> Adapter:
    """Read an adapter written by :func:`save_adapter`."""
    d = Path(directory)
    cfg_file, weights = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_file.is_file() or not weights.is_file():
        raise AdapterError(f"{d} is not a sora-jax adapter directory: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT:
        raise AdapterError(
            f"{cfg_file} is not a sora-jax adapter config (format={meta.get('format')!r}); a PEFT adapter "
            f"directory is loaded with peft.PeftModel.from_pretrained"
        )
    config = AdapterConfig.from_dict(meta["config"])
    layers: dict[str, dict] = {}
    for key, value in load_file(str(weights)).items():
        path, name = key.rsplit("/", 1)
        layers.setdefault(path, {})[name] = value
    return Adapter(config, layers)
