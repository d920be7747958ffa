"""What the experiment scripts share: atomic writes, the versions and devices a result records, step-time
statistics, the progress bar, the per-layer update spectrum, and the dataclass-driven command-line options.

Options are dataclass fields made with :func:`option` (help, type, choices, default and whether the option
changes the training trajectory); :class:`OptionParser` turns dataclasses into an ``argparse`` parser (one
help group per dataclass) and :func:`trajectory_options` picks the options a resume fingerprint covers, so
that the fingerprint follows the options by construction.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from transformers.hf_argparser import HfArgumentParser

import sora_jax
from sora_jax import compile_cache
from sora_jax.models.common import REMAT_POLICIES
from sora_jax.train import step_time_stats

if TYPE_CHECKING:
    from sora_jax.train import StepInfo

ROOT = Path(__file__).resolve().parents[1]

# what a training run records (``results.json`` "versions"); the benchmarks add torch and peft
TRAINING_PACKAGES = (
    "sora_jax",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "transformers",
    "numpy",
    "tokenizers",
)
BENCH_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "peft", "sora-jax")


# -- atomic writes -----------------------------------------------------------------------------------
def _write_atomic(path: Path, mode: str, write: Callable[[IO], Any]) -> None:
    """``write(file)`` into a temporary file beside ``path`` (``.<name>.<random>``), then ``os.replace``;
    nothing is left behind on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_default(x: Any) -> Any:
    """``json.dumps(default=...)`` for NumPy scalars and arrays and paths."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same directory + ``os.replace``)."""
    _write_atomic(path, "w", lambda f: f.write(text))


def write_json_atomic(path: Path, data: Any, indent: int = 2) -> None:
    """Write ``data`` as JSON (NumPy values and paths allowed) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=indent, default=json_default))


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to ``path`` atomically."""
    _write_atomic(path, "wb", lambda f: np.savez(f, **arrays))


# -- what a result records ---------------------------------------------------------------------------
def versions(packages: Sequence[str] = TRAINING_PACKAGES) -> dict[str, str | None]:
    """``{"python": ..., package: version or None when not installed}``; sora-jax's is the running code's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in packages:
        if pkg in ("sora_jax", "sora-jax"):
            out[pkg] = sora_jax.__version__
            continue
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def devices() -> list[str]:
    """The JAX devices as ``platform:id:kind`` strings."""
    import jax

    return [f"{d.platform}:{d.id}:{getattr(d, 'device_kind', '')}" for d in jax.devices()]


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on: JAX backend and first device, CPU model and count, the GPU (name and
    count, else None) and the allocator settings (they change CPU step times a lot: XLA allocates each step's
    temporaries afresh; experiments/PERF.md)."""
    import jax

    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if dev.platform == "gpu":
        gpu = {"name": getattr(dev, "device_kind", str(dev)), "count": len(jax.devices())}
    return {
        "jax_backend": jax.default_backend(),
        "jax_device": str(dev),
        "cpu": cpu,
        "cpu_count": len(os.sched_getaffinity(0)),
        "gpu": gpu,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "malloc_conf": os.environ.get("MALLOC_CONF"),
    }


def step_stats(times: Iterable[float], unit: str = "s") -> dict[str, float]:
    """Median, p10 and p90 of step times in seconds (``unit="ms"``: milliseconds) as ``median_<unit>``,
    ``p10_<unit>``, ``p90_<unit>`` (:func:`sora_jax.train.step_time_stats`); ``{}`` without times."""
    scale = {"s": 1.0, "ms": 1e3}[unit]
    stats = step_time_stats(np.asarray(list(times), np.float64) * scale)
    return {f"{q}_{unit}": stats[f"{q}_s"] for q in ("median", "p10", "p90") if f"{q}_s" in stats}


def per_layer_spectrum(spec: dict[str, Any], stacked: str | None) -> dict[str, Any]:
    """:func:`sora_jax.spectrum`'s result with a scanned stack's entries (lists over the ``L`` blocks at
    ``stacked/...``) split into one entry per block at ``stacked_N/...``."""
    out: dict[str, Any] = {}
    for path, value in spec.items():
        if stacked is None or not path.startswith(stacked + "/"):
            out[path] = value
            continue
        for i in range(len(value["entropy"])):
            out[f"{stacked}_{i}{path[len(stacked) :]}"] = {k: v[i] for k, v in value.items()}
    return dict(sorted(out.items()))


# -- progress ----------------------------------------------------------------------------------------
def log(msg: str) -> None:
    """A progress line on stderr (flushed: the benchmarks' tables go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """A tqdm bar over optimizer steps with the smoothed loss and examples/s (ETA from tqdm)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)
        self.loss: float | None = None

    def step(self, info: StepInfo) -> None:
        self.loss = info.loss if self.loss is None else 0.9 * self.loss + 0.1 * info.loss
        self.bar.set_postfix(
            loss=f"{self.loss:.4f}", ex_s=f"{info.examples / max(info.seconds, 1e-9):.1f}", refresh=False
        )
        self.bar.update(1)

    def epoch(self, record: dict) -> None:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
        self.bar.write(f"epoch {record['epoch']}: {shown}")

    def close(self) -> None:
        self.bar.close()


# -- dataclass-driven options ------------------------------------------------------------------------
def positive(kind: type) -> Callable[[str], Any]:
    """An ``argparse`` type: a finite number of type ``kind`` above 0."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def option(
    default: Any = dataclasses.MISSING,
    help: str | None = None,
    *,
    type: Callable[[str], Any] | None = None,
    choices: Sequence[Any] | None = None,
    action: Any = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    trajectory: bool = True,
) -> Any:
    """A dataclass field that is the option ``--<field-name-with-dashes>`` of :class:`OptionParser`.

    Args:
      default: the option's default (none and no ``default_factory``: the option is required).
      help: its help text.
      type: parses the command-line text (default: the field's annotation, ``X | None`` as ``X``).
      choices: the allowed values.
      action: an ``argparse`` action (a ``bool`` field without one is a ``store_true`` flag).
      default_factory: computes the default when the parser is built (for defaults read from the environment).
      trajectory: whether the option changes the training trajectory, i.e. belongs to the resume fingerprint
        (:func:`trajectory_options`); output paths, resuming, logging and devices do not.
    """
    meta: dict[str, Any] = {"help": help, "trajectory": trajectory}
    for key, value in (("type", type), ("choices", choices), ("action", action)):
        if value is not None:
            meta[key] = value
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def _scalar(annotation: Any) -> Any:
    """``X`` of ``X | None``; any other annotation as it is."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (arg,) = (a for a in typing.get_args(annotation) if a is not type(None))
        return arg
    return annotation


class OptionParser(HfArgumentParser):
    """:class:`transformers.HfArgumentParser` with argparse's conventions kept exactly: each field is one option
    ``--name-with-dashes`` (no ``--name_with_underscores`` alias), a ``bool`` field is a flag that takes no value
    (``store_true``, or the field's ``action``), and type, choices and help come from the field's :func:`option`
    metadata. A dataclass's class attribute ``_argument_group_name`` puts its options in that help group; the
    dataclasses' fields are the options in order.

    ``parse_args`` gives one flat ``argparse.Namespace`` (argparse's errors and exit status 2 unchanged).
    """

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        meta = field.metadata
        kwargs: dict[str, Any] = {"dest": field.name, "help": meta.get("help")}
        if field.default is not dataclasses.MISSING:
            kwargs["default"] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            kwargs["default"] = field.default_factory()
        else:
            kwargs["required"] = True
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if "action" in meta:
            kwargs["action"] = meta["action"]
        elif field.type is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = meta.get("type", _scalar(field.type))
        parser.add_argument("--" + field.name.replace("_", "-"), **kwargs)


def trajectory_fields(option_types: Iterable[type]) -> tuple[str, ...]:
    """The names of the options (fields of ``option_types``) that change the training trajectory."""
    return tuple(f.name for t in option_types for f in dataclasses.fields(t) if f.metadata.get("trajectory", True))


def trajectory_options(args: argparse.Namespace, option_types: Iterable[type]) -> dict[str, Any]:
    """``{name: value}`` of the trajectory options in ``args``, in option order (the resume fingerprint's
    input, with the adapter and training configurations)."""
    return {name: getattr(args, name) for name in trajectory_fields(option_types)}


def check_training_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks every training command line makes (``parser.error``: usage, the message, exit status 2)."""
    if not 0.0 <= args.warmup_ratio < 1.0:
        parser.error(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if not 0.0 <= args.lora_dropout < 1.0:
        parser.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.batch_size % args.grad_accum:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of --grad-accum {args.grad_accum}")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")


# options both training command lines have
@dataclasses.dataclass
class AdapterOptions:
    """The adapter's options (:class:`sora_jax.AdapterConfig`); a command line may override defaults in a
    subclass (a redefined field keeps its place)."""

    _argument_group_name = "adapter"
    r: int = option(16, type=positive(int))
    lora_alpha: float = option(16.0, type=positive(float))
    rotation_rank: int = option(1, type=positive(int))
    rotation: str = option("taylor", choices=sora_jax.ROTATIONS)
    lora_dropout: float = option(0.0)


def scan_layers_option() -> Any:
    """``--scan-layers`` / ``--no-scan-layers`` (:func:`sora_jax.models.common.scan_blocks`)."""
    return option(
        False,
        "run the transformer blocks under nn.scan: one compiled block (compile time independent of depth)",
        action=argparse.BooleanOptionalAction,
    )


def remat_option() -> Any:
    """``--remat`` of the scanned blocks."""
    return option(
        "none",
        "with --scan-layers: recompute each block in the backward pass (full) or keep only matmuls (dots)",
        choices=REMAT_POLICIES,
    )


def compile_cache_option() -> Any:
    """``--compile-cache DIR`` (default :func:`sora_jax.compile_cache.default_dir`, read when the parser is
    built; ``none`` disables)."""
    return option(
        default_factory=lambda: str(compile_cache.default_dir()),
        help="JAX persistent compilation cache directory ('none' disables it; env SORA_JAX_COMPILE_CACHE)",
        trajectory=False,
    )


def run_command(prog: str, compile_cache_dir: str, run: Callable[[], Any], user_errors: tuple[type, ...]) -> int:
    """Enable the compilation cache, then ``run()``. A cache directory that cannot be made and the user's
    errors (``user_errors``: bad input or files) are one line ``<prog>: error: ...`` and exit status 2;
    warnings (a damaged checkpoint skipped) one line ``<prog>: warning: ...`` each."""
    try:
        compile_cache.enable(compile_cache_dir)
    except OSError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_, **__: f"{prog}: warning: {message}\n"
    try:
        run()
    except user_errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning
    return 0
