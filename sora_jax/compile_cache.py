"""JAX's persistent compilation cache, switched on for a process in one call.

A training step compiles once per batch shape (seconds to minutes on a CPU); with the cache on, a later
process that compiles the same program (same shapes, flags, JAX version and backend) loads the
executable from disk instead. JAX keys the cache itself, so a changed program never reuses a stale
entry.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import jax
import jax.monitoring

ENV = "SORA_JAX_COMPILE_CACHE"
DISABLED = ("", "none", "off", "0")


def default_dir() -> Path | None:
    """``$SORA_JAX_COMPILE_CACHE`` if set (``none`` disables), else ``$XDG_CACHE_HOME/sora_jax/jax``
    (``~/.cache/sora_jax/jax``)."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in DISABLED else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sora_jax" / "jax"


def enable(directory: str | os.PathLike[str] | None) -> Path | None:
    """Use ``directory`` as JAX's persistent compilation cache for every later compilation in this
    process, caching every program whatever its compile time or size; ``None`` or ``"none"`` leaves the
    cache off. Returns the directory in use (``None`` when off).

    Raises:
      OSError: the directory cannot be created or written (the message names it).
    """
    if directory is None or str(directory).strip().lower() in DISABLED:
        return None
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise OSError(
            f"compilation cache directory {path} is not writable ({e.strerror}); pass another with "
            f"--compile-cache DIR, or --compile-cache none to run without it"
        ) from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# JAX's own compile-time events: tracing to a jaxpr, lowering to StableHLO, and the backend step (an XLA
# compilation, or loading the executable from the persistent cache)
COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "backend_s",
}
_seconds: dict[str, float] = defaultdict(float)
_listening = False


def _record(event: str, duration: float, **kwargs: object) -> None:
    key = COMPILE_EVENTS.get(event)
    if key is not None:
        _seconds[key] += duration


def compile_seconds() -> dict[str, float]:
    """Seconds this process has spent compiling since the first call of this function, from
    ``jax.monitoring``'s events: ``trace_s`` (Python to jaxpr), ``lower_s`` (jaxpr to StableHLO),
    ``backend_s`` (XLA compilation or a persistent-cache load) and their sum ``total_s``. Compare two
    readings for the compile time of the work between them."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_record)
        _listening = True
    out = {k: _seconds[k] for k in COMPILE_EVENTS.values()}
    out["total_s"] = sum(out.values())
    return out
