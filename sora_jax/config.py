"""`AdapterConfig`: which method, which layers, which ranks (data only; docs/spec.md section 2).

Targeting works as in HF PEFT, on pytree paths. A *module* is the parent of a leaf named ``kernel``;
its path is the ``/``-joined keys (``encoder/layer_0/attention/query``). ``target_modules`` is either
a regex string matched with ``re.fullmatch`` against that path, or a sequence of names: a module is
selected when its path equals an entry or ends with ``/`` + entry (``.`` in an entry is read as ``/``,
so PEFT's ``"attention.output.dense"`` works). ``exclude_modules`` removes modules the same way.
``rank_pattern`` / ``alpha_pattern`` map a regex (``re.search`` on the path, as PEFT's key matching)
to a per-module ``r`` / ``lora_alpha``.

Which leaf is a module's weight, and how its axes read, is data too (:mod:`sora_jax.layout`):
``weight_leaves`` names the weight leaves and their feature order (default ``kernel`` ``(d_in, d_out)``
as in Flax, ``weight`` ``(d_out, d_in)`` as in PyTorch and Equinox), ``bias_leaf`` the bias's name, and
``kernel_axes`` maps a regex (``re.search`` on the path) to the roles of a weight's axes
(``"ioo"`` for a ``DenseGeneral`` kernel ``(d_in, heads, head_dim)``, ``"sio"`` for a scanned stack).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

ROTATIONS = ("taylor", "cayley", "exp")
_ENCODER_BLOCK = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
# The paper's targets (docs/spec.md section 5: every linear layer of every block), by Hugging Face model_type,
# as ``target_modules`` names (PEFT-style suffixes of our models' module paths).
PAPER_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": _ENCODER_BLOCK,
    "roberta": _ENCODER_BLOCK,
    "xlm-roberta": _ENCODER_BLOCK,
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                   "output.dense"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
# The paper's decoder targets for instruction tuning of causal LMs (DoRA's commonsense setting).
PAPER_DECODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


DEFAULT_WEIGHT_LEAVES: tuple[tuple[str, str], ...] = (("kernel", "io"), ("weight", "oi"))


class AdapterError(ValueError):
    """A configuration, target or shape problem, raised before any computation."""


Patterns = str | tuple[str, ...] | None


def _freeze_patterns(value: Any, name: str) -> Patterns:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        if not all(isinstance(v, str) for v in value):
            raise AdapterError(f"{name} must be a regex string or a list of module names, got {value!r}")
        return tuple(value)
    raise AdapterError(f"{name} must be a regex string or a list of module names, got {type(value).__name__}")


def _freeze_mapping(value: Any, name: str, cast: type) -> tuple[tuple[str, Any], ...]:
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    try:
        return tuple((str(k), cast(v)) for k, v in items)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{name} must map regex patterns to numbers, got {value!r}") from e


def matches(patterns: Patterns, path: str) -> bool:
    """PEFT-style module selection on a ``/``-joined path (see module docstring)."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    for entry in patterns:
        entry = entry.replace(".", "/")
        if path == entry or path.endswith("/" + entry):
            return True
    return False


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """An adapter method and where it applies. Immutable, hashable, JSON round-trippable.

    Attributes:
      method: a name in :data:`sora_jax.methods.METHODS` (``lora, dora, prediag, sora, pre_ortho,
        post_ortho``, ...; docs/spec.md section 2).
      r: LoRA rank (``A: (d_in, r)``, ``B: (r, d_out)``).
      lora_alpha: LoRA scale numerator: ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
      use_rslora: rank-stabilised scaling.
      rotation_rank: ``r_p``, columns of the rotation factors ``C, D: (d_out, r_p)``.
      initial_s_p: ``s_p = min(1, initial_s_p / (||C||_F + ||D||_F + 1e-6))``.
      rotation: ``taylor`` (the paper's ``R = I + K``), ``cayley`` or ``exp`` (exactly orthogonal).
      target_modules: regex string or names (see module docstring). ``None`` selects nothing.
      exclude_modules: the same, removed from the selection.
      rank_pattern: ``{regex: r}`` per-module rank overrides (``re.search`` on the path).
      alpha_pattern: ``{regex: lora_alpha}`` per-module alpha overrides.
      lora_dropout: dropout on the input of the ``s A B`` branch (activation path only).
      modules_to_save: module names trained in full beside the adapter (a task head), matched like
        ``target_modules``.
      weight_leaves: ``{leaf name: "io" | "oi"}``: the leaves that are a module's weight and the order of
        their feature axes (``"io"``: ``(d_in, d_out)``; ``"oi"``: ``(d_out, d_in)``). Default
        ``{"kernel": "io", "weight": "oi"}`` (Flax; PyTorch and Equinox).
      bias_leaf: the name of a module's bias leaf (a sibling of the weight).
      kernel_axes: ``{regex: roles}``: the role of each weight axis, one letter per axis (``s`` stacked,
        ``i`` input feature, ``o`` output feature), for the modules whose path the regex is found in
        (``re.search``; first match wins). Needed only where the shape alone is ambiguous
        (:mod:`sora_jax.layout`).
    """

    method: str = "lora"
    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    rotation_rank: int = 1
    initial_s_p: float = 1.0
    rotation: str = "taylor"
    target_modules: Patterns = None
    exclude_modules: Patterns = None
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    lora_dropout: float = 0.0
    modules_to_save: Patterns = None
    weight_leaves: tuple[tuple[str, str], ...] = DEFAULT_WEIGHT_LEAVES
    bias_leaf: str = "bias"
    kernel_axes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "target_modules", _freeze_patterns(self.target_modules, "target_modules"))
        set_(self, "exclude_modules", _freeze_patterns(self.exclude_modules, "exclude_modules"))
        set_(self, "modules_to_save", _freeze_patterns(self.modules_to_save, "modules_to_save"))
        set_(self, "rank_pattern", _freeze_mapping(self.rank_pattern, "rank_pattern", int))
        set_(self, "alpha_pattern", _freeze_mapping(self.alpha_pattern, "alpha_pattern", float))
        set_(self, "weight_leaves", _freeze_mapping(self.weight_leaves, "weight_leaves", str))
        set_(self, "kernel_axes", _freeze_mapping(self.kernel_axes, "kernel_axes", str))
        set_(self, "lora_alpha", float(self.lora_alpha))
        set_(self, "initial_s_p", float(self.initial_s_p))
        from sora_jax.methods import METHODS  # the method table (imports JAX; this module stays data only)

        if self.method not in METHODS:
            raise AdapterError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.rotation not in ROTATIONS:
            raise AdapterError(f"unknown rotation {self.rotation!r}; choose one of {', '.join(ROTATIONS)}")
        ranks = [self.r] + [v for _, v in self.rank_pattern]
        if any(not isinstance(v, int) or v < 1 for v in ranks):
            raise AdapterError(f"rank r must be a positive integer, got {ranks}")
        if self.rotation_rank < 1:
            raise AdapterError(f"rotation_rank must be >= 1, got {self.rotation_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name, order in self.weight_leaves:
            if order not in ("io", "oi"):
                raise AdapterError(
                    f"weight_leaves[{name!r}] = {order!r}; use 'io' for a (d_in, d_out) weight (Flax kernel) or "
                    f"'oi' for (d_out, d_in) (PyTorch, Equinox weight)"
                )
        if not self.weight_leaves:
            raise AdapterError("weight_leaves is empty; name at least one weight leaf, e.g. {'kernel': 'io'}")
        for pattern, roles in self.kernel_axes:
            if not roles or set(roles) - set("sio") or "i" not in roles or "o" not in roles:
                raise AdapterError(
                    f"kernel_axes[{pattern!r}] = {roles!r}; give one letter per weight axis: 's' (stacked layer "
                    f"index), 'i' (input feature), 'o' (output feature), at least one 'i' and one 'o' "
                    f"(e.g. 'ioo' for a DenseGeneral kernel (d_in, heads, head_dim))"
                )
        for pattern, _ in (*self.rank_pattern, *self.alpha_pattern, *self.kernel_axes):
            try:
                re.compile(pattern)
            except re.error as e:
                raise AdapterError(f"invalid regex {pattern!r} in rank_pattern/alpha_pattern/kernel_axes: {e}") from e
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise AdapterError(f"invalid target_modules regex {self.target_modules!r}: {e}") from e

    # -- selection ----------------------------------------------------------------------------
    def targets(self, path: str) -> bool:
        """Whether the module at ``path`` is adapted."""
        return matches(self.target_modules, path) and not matches(self.exclude_modules, path)

    def saves(self, path: str) -> bool:
        """Whether the module at ``path`` is trained in full (``modules_to_save``)."""
        return matches(self.modules_to_save, path)

    def rank_for(self, path: str) -> int:
        for pattern, value in self.rank_pattern:
            if re.search(pattern, path):
                return value
        return self.r

    def alpha_for(self, path: str) -> float:
        for pattern, value in self.alpha_pattern:
            if re.search(pattern, path):
                return value
        return self.lora_alpha

    def axes_for(self, path: str) -> str | None:
        """The declared axis roles of the weight of the module at ``path`` (``kernel_axes``), or ``None``."""
        for pattern, value in self.kernel_axes:
            if re.search(pattern, path):
                return value
        return None

    def scaling_for(self, path: str) -> float:
        """``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (docs/spec.md section 1)."""
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.use_rslora else r)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rank_pattern"] = dict(self.rank_pattern)
        d["alpha_pattern"] = dict(self.alpha_pattern)
        d["weight_leaves"] = dict(self.weight_leaves)
        d["kernel_axes"] = dict(self.kernel_axes)
        for k in ("target_modules", "exclude_modules", "modules_to_save"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdapterConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise AdapterError(f"unknown AdapterConfig fields {unknown}; known fields: {sorted(fields)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        return cls.from_dict(json.loads(text))
