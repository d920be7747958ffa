"""The spectrum of the update ``Delta W = W' - W`` per adapted layer (docs/spec.md section 4).

- singular value entropy ``H = -sum_i p_i ln p_i`` with ``p_i = sigma_i^2 / sum_j sigma_j^2``,
- effective rank ``exp(H)``,
- stable rank ``||Delta W||_F^2 / ||Delta W||_2^2``.

Computed on the host in float64 (NumPy), never inside a jitted step. A zero update has entropy 0,
effective rank 0 and stable rank 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sora_jax.adapter import Adapter, effective_matrices


def spectrum_of(delta: np.ndarray) -> dict[str, float]:
    """Entropy, effective rank and stable rank of one matrix ``delta: (d_in, d_out)``.

    The energies ``sigma_i^2`` are the eigenvalues of the smaller Gram matrix (``delta^T delta`` or
    ``delta delta^T``, ``k x k`` with ``k = min(d_in, d_out)``), which costs a fraction of an SVD; round-off
    leaves the zero energies of a low-rank update at about ``1e-16 * sigma_1^2``, whose share of the
    entropy is below ``1e-12``.
    """
    d = np.asarray(delta, np.float64)
    gram = d.T @ d if d.shape[0] >= d.shape[1] else d @ d.T
    energy = np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)
    total = energy.sum()
    if total <= 0.0:
        return {"entropy": 0.0, "effective_rank": 0.0, "stable_rank": 0.0}
    p = energy / total
    p = p[p > 0]
    h = float(-(p * np.log(p)).sum())
    return {"entropy": h, "effective_rank": float(np.exp(h)), "stable_rank": float(total / energy[0])}


def spectrum(params: Any, adapter: Adapter) -> dict[str, Any]:
    """``{path: {"entropy", "effective_rank", "stable_rank"}}`` of ``Delta W = W' - W`` per adapted layer.

    ``Delta W`` is the module's matrix ``(d_in, d_out)`` (:mod:`sora_jax.layout`: a ``DenseGeneral`` kernel
    over several feature axes is one matrix). For stacked kernels ``(*stacked, d_in, d_out)`` each value
    is a nested list over the stacked axes.
    """
    new = effective_matrices(params, adapter, compute_dtype=np.float32)
    out: dict[str, Any] = {}
    for path, (mod, W_new, _) in new.items():
        W_old = mod.layout.to_matrix(np.asarray(mod.kernel))
        delta = np.asarray(W_new, np.float64) - np.asarray(W_old, np.float64)
        lead = delta.shape[:-2]
        flat = [spectrum_of(m) for m in delta.reshape(-1, *delta.shape[-2:])]
        if not lead:
            out[path] = flat[0]
        else:
            keys = ("entropy", "effective_rank", "stable_rank")
            out[path] = {k: np.array([f[k] for f in flat]).reshape(lead).tolist() for k in keys}
    return out
