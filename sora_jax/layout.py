"""How a weight leaf is read as a matrix: one role per axis, declared or read off the leaf and its bias.

Every axis of a weight leaf has a *role*, one letter per axis:

- ``s``: a stacked layer index (``nn.scan``/``vmap`` over layers): each index is its own layer;
- ``i``: an input feature axis; ``o``: an output feature axis.

The layer's matrix is ``W: (*stacked, d_in, d_out)`` with ``d_in`` the product of the ``i`` axes and
``d_out`` the product of the ``o`` axes (a Flax ``DenseGeneral`` query kernel ``(d_in, heads, head_dim)``,
roles ``ioo``, is one ``(d_in, heads * head_dim)`` matrix; an attention output kernel
``(heads, head_dim, d_out)``, roles ``iio``, is one ``(heads * head_dim, d_out)`` matrix; a PyTorch or
Equinox ``weight (d_out, d_in)`` has roles ``oi``). The bias has the weight's ``s`` and ``o`` axes, in
the weight's order (``(heads, head_dim)``, ``(L, d_out)``, ``(d_out,)``).

A leaf name's convention (``AdapterConfig.weight_leaves``: ``kernel`` -> ``io``, ``weight`` -> ``oi``)
fixes the order of the feature axes; a 2-D leaf is then unambiguous. For more axes the roles are
``s* i+ o+`` (``s* o+ i+``) and the split is read off the bias when exactly one split fits its
shape; otherwise (no bias, or shapes that fit several splits) the roles must be declared with
``AdapterConfig.kernel_axes``, or :func:`resolve` raises an :class:`~sora_jax.config.AdapterError`
that lists the readings. Never a guess.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from sora_jax.config import AdapterConfig, AdapterError

ROLES = "sio"


@dataclasses.dataclass(frozen=True)
class Layout:
    """A weight leaf of ``shape`` with axis ``roles`` (one of ``s``, ``i``, ``o`` per axis)."""

    roles: str
    shape: tuple[int, ...]

    def _axes(self, role: str) -> tuple[int, ...]:
        return tuple(k for k, c in enumerate(self.roles) if c == role)

    @property
    def lead(self) -> tuple[int, ...]:
        """The stacked axes' sizes, in order."""
        return tuple(self.shape[k] for k in self._axes("s"))

    @property
    def d_in(self) -> int:
        return math.prod(self.shape[k] for k in self._axes("i"))

    @property
    def d_out(self) -> int:
        return math.prod(self.shape[k] for k in self._axes("o"))

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """``(*stacked, d_in, d_out)``."""
        return (*self.lead, self.d_in, self.d_out)

    @property
    def bias_shape(self) -> tuple[int, ...]:
        """The bias leaf's shape: the weight's ``s`` and ``o`` axes in the weight's order."""
        return tuple(n for n, c in zip(self.shape, self.roles, strict=True) if c != "i")

    @property
    def is_plain(self) -> bool:
        """Whether the leaf already is ``(*stacked, d_in, d_out)`` (roles ``s* i o``)."""
        n = len(self.roles)
        return self.roles == "s" * (n - 2) + "io"

    def _perm(self) -> tuple[int, ...]:
        return self._axes("s") + self._axes("i") + self._axes("o")

    def to_matrix(self, W: Any) -> Any:
        """The leaf ``W: shape`` as ``(*stacked, d_in, d_out)``."""
        if self.is_plain:
            return W
        return jnp.transpose(W, self._perm()).reshape(self.matrix_shape)

    def from_matrix(self, M: Any) -> Any:
        """Inverse of :meth:`to_matrix`: ``M: (*stacked, d_in, d_out)`` back to the leaf's ``shape``."""
        if self.is_plain:
            return M
        perm = self._perm()
        M = M.reshape(tuple(self.shape[k] for k in perm))
        inverse = tuple(perm.index(k) for k in range(len(perm)))
        return jnp.transpose(M, inverse)

    def bias_to_vector(self, b: Any) -> Any:
        """The bias ``b: bias_shape`` as ``(*stacked, d_out)``."""
        kept = [c for c in self.roles if c != "i"]
        perm = tuple(k for k, c in enumerate(kept) if c == "s") + tuple(k for k, c in enumerate(kept) if c == "o")
        if perm == tuple(range(len(perm))):
            return b.reshape((*self.lead, self.d_out))
        return jnp.transpose(b, perm).reshape((*self.lead, self.d_out))

    def bias_from_vector(self, v: Any) -> Any:
        """Inverse of :meth:`bias_to_vector`."""
        kept = [c for c in self.roles if c != "i"]
        perm = tuple(k for k, c in enumerate(kept) if c == "s") + tuple(k for k, c in enumerate(kept) if c == "o")
        v = v.reshape(tuple(self.bias_shape[k] for k in perm))
        if perm == tuple(range(len(perm))):
            return v
        return jnp.transpose(v, tuple(perm.index(k) for k in range(len(perm))))


def describe(layout: Layout) -> str:
    """``'ioo': one (8, 8) matrix`` / ``'sio': 3 stacked (12, 10) matrices``."""
    n = math.prod(layout.lead)
    what = f"one ({layout.d_in}, {layout.d_out}) matrix" if not layout.lead else (
        f"{n} stacked ({layout.d_in}, {layout.d_out}) matrices"
    )
    return f"{layout.roles!r}: {what}"


def candidates(order: str, shape: tuple[int, ...]) -> list[Layout]:
    """Every reading of a leaf of ``shape`` under a leaf-name convention ``order`` (``"io"`` or ``"oi"``):
    roles ``s* i+ o+`` (``s* o+ i+``), leading stacked axes first."""
    n = len(shape)
    out = []
    for n_lead in range(n - 1):
        for n_first in range(1, n - n_lead):
            n_second = n - n_lead - n_first
            roles = "s" * n_lead + order[0] * n_first + order[1] * n_second
            out.append(Layout(roles, tuple(shape)))
    return out


def _declaration_hint(path: str, readings: list[Layout]) -> str:
    roles = ", ".join(repr(c.roles) for c in readings)
    return (
        f"declare which with AdapterConfig(kernel_axes={{{path + '$'!r}: ROLES}}), ROLES one of {roles} "
        f"(one letter per axis: 's' stacked layer index, 'i' input feature, 'o' output feature; the key is a "
        f"regex searched in the module path)"
    )


def check_roles(path: str, roles: str, shape: tuple[int, ...], bias_shape: tuple[int, ...] | None) -> Layout:
    """The declared ``roles`` for the leaf of ``shape`` at ``path``, validated against it and its bias."""
    if len(roles) != len(shape) or set(roles) - set(ROLES) or "i" not in roles or "o" not in roles:
        raise AdapterError(
            f"module {path!r}: kernel_axes gives roles {roles!r} for a weight of shape {shape}; give one letter "
            f"per axis ({len(shape)} letters) from 's' (stacked), 'i' (input feature), 'o' (output feature), "
            f"with at least one 'i' and one 'o'"
        )
    layout = Layout(roles, tuple(shape))
    if bias_shape is not None and tuple(bias_shape) != layout.bias_shape:
        raise AdapterError(
            f"module {path!r}: the bias has shape {tuple(bias_shape)}, but a weight of shape {shape} with roles "
            f"{roles!r} has a bias of shape {layout.bias_shape} (its 's' and 'o' axes); fix the kernel_axes "
            f"entry for this module"
        )
    return layout


def resolve(
    path: str, weight_name: str, order: str, shape: tuple[int, ...], bias_shape: tuple[int, ...] | None,
    config: AdapterConfig,
) -> Layout:
    """The :class:`Layout` of the weight leaf ``weight_name: shape`` of the module at ``path``.

    A ``config.kernel_axes`` entry whose regex is found in ``path`` decides; otherwise the leaf name's
    ``order`` (``"io"``/``"oi"``) and the bias (see the module docstring).

    Raises:
      AdapterError: a leaf with fewer than 2 axes, a declaration that does not fit, a bias no reading fits,
        or an ambiguous shape (the message lists the readings and the declaration to add).
    """
    shape = tuple(int(n) for n in shape)
    declared = config.axes_for(path)
    if declared is not None:
        return check_roles(path, declared, shape, bias_shape)
    if len(shape) < 2:
        raise AdapterError(
            f"module {path!r} is selected but its {weight_name} has shape {shape}, not a matrix (d_in, d_out); "
            f"exclude it with exclude_modules or narrow target_modules"
        )
    readings = candidates(order, shape)
    if bias_shape is not None:
        fitting = [c for c in readings if c.bias_shape == tuple(bias_shape)]
        if not fitting:
            raise AdapterError(
                f"module {path!r}: bias shape {tuple(bias_shape)} does not match {weight_name} {shape} under any "
                f"reading ({'; '.join(f'{describe(c)} needs bias {c.bias_shape}' for c in readings)}); fix the "
                f"params, or " + _declaration_hint(path, readings)
            )
        readings = fitting
    if len(readings) > 1:
        why = "no bias tells them apart" if bias_shape is None else f"its bias {tuple(bias_shape)} fits several"
        raise AdapterError(
            f"module {path!r}: the {weight_name} of shape {shape} can be read as "
            f"{'; '.join(describe(c) for c in readings)} ({why}); "
            + _declaration_hint(path, readings)
        )
    return readings[0]
