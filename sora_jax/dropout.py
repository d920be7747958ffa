"""Dropout masks: the values of ``jax.random.bernoulli``, from a Threefry hash that XLA:CPU runs fast.

JAX lowers its Threefry-2x32 hash on the CPU as a rolled loop: five steps, each reading and writing two
``uint32`` arrays of the mask's size. For the masks of a training step that loop is slow to run (the
attention probabilities' mask alone is ``(B, H, T, S)``; a BERT GLUE step spent 28-42 % of its time in
dropout, experiments/PERF.md change 26). :func:`bernoulli` computes the very same bits (the hash of every
element's flat index, as JAX's default ``jax_threefry_partitionable`` does) with the twenty rounds written
out, which XLA fuses into the mask's consumers: no intermediate arrays (10-13 % of the step, compile time
unchanged). The masks, and so a run's results, are those of ``jax.random.bernoulli``;
other generators (``rbg``, ``unsafe_rbg``), the non-partitionable Threefry layout, 64-bit floats and
masks of ``2**32`` or more elements go to ``jax.random.bernoulli`` itself.

- :func:`threefry2x32`: the hash (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011);
- :func:`bernoulli`: ``jax.random.bernoulli(key, p, shape)``;
- :func:`dropout`: ``x / (1 - rate)`` where kept, ``0`` elsewhere (Flax's ``nn.Dropout``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotl(v: Array, r: int) -> Array:
    return lax.shift_left(v, np.uint32(r)) | lax.shift_right_logical(v, np.uint32(32 - r))


def threefry2x32(k1: Array, k2: Array, x1: Array, x2: Array) -> tuple[Array, Array]:
    """Threefry-2x32 with 20 rounds of the key ``(k1, k2)`` (``uint32`` scalars) on the counter words
    ``(x1, x2)`` (``uint32``, one shape); the outputs have ``x1``'s shape. Equal to JAX's
    ``threefry2x32_p``, written out round by round."""
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    a, b = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            a = a + b
            b = a ^ _rotl(b, r)
        a = a + ks[(i + 1) % 3]
        b = b + ks[(i + 2) % 3] + np.uint32(i + 1)
    return a, b


def _threefry_key_data(key: Array) -> Array | None:
    """``(2,)`` ``uint32`` key data of a single Threefry key, or ``None`` for any other key."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != () or str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        return jax.random.key_data(key)
    if key.dtype == jnp.uint32 and key.shape == (2,) and jax.config.jax_default_prng_impl == "threefry2x32":
        return key
    return None


def bernoulli(key: Array, p: float, shape: Sequence[int]) -> Array:
    """``jax.random.bernoulli(key, p, shape)``: a boolean ``shape`` array, ``True`` with probability ``p``.

    For a Threefry key (the default): ``u = bitcast((bits >> 9) | 0x3F800000) - 1`` (float32 in
    ``[0, 1)``) with ``bits = y1 ^ y2``, ``(y1, y2) = threefry2x32(key, (0, i))`` of every element's flat
    index ``i``; the mask is ``u < p``. Bit for bit the masks of ``jax.random.bernoulli``."""
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    data = _threefry_key_data(key)
    if (
        data is None
        or not getattr(jax.config, "jax_threefry_partitionable", True)  # the only layout once JAX drops the flag
        or lax.dtype(p) != jnp.float32
        or size >= 2**32
        or size == 0
    ):
        return jax.random.bernoulli(key, p, shape)
    index = lax.iota(np.uint32, size).reshape(shape)
    y1, y2 = threefry2x32(data[0], data[1], jnp.zeros(shape, np.uint32), index)
    bits = y1 ^ y2
    u = lax.bitcast_convert_type(lax.shift_right_logical(bits, np.uint32(9)) | np.uint32(0x3F800000), jnp.float32)
    return u - np.float32(1.0) < np.float32(p)


def dropout(x: Array, rate: float, key: Array | None, broadcast_dims: Sequence[int] = ()) -> Array:
    """Inverted dropout: ``x / (1 - rate)`` where :func:`bernoulli` keeps (probability ``1 - rate``), else
    0; ``x`` itself for ``key=None`` or ``rate == 0``, zeros for ``rate == 1``. ``broadcast_dims`` share one
    mask along those axes. The values of Flax's ``nn.Dropout`` with the same key."""
    if key is None or rate == 0.0:
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    keep = 1.0 - rate
    shape = [1 if d in {a % x.ndim for a in broadcast_dims} else n for d, n in enumerate(x.shape)]
    mask = jnp.broadcast_to(bernoulli(key, keep, shape), x.shape)
    return lax.select(mask, x / keep, jnp.zeros_like(x))
