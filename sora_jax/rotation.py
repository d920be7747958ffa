"""Low-rank skew-symmetric rotations ``R`` acting on output features (docs/spec.md section 2, "The rotation").

The generator is ``K = s_p (C D^T - D C^T)`` with ``C, D: (d_out, r_p)`` and
``s_p = min(1, initial_s_p / (||C||_F + ||D||_F + 1e-6))``. Writing ``U = [C, D]: (d_out, 2 r_p)`` and
``J = s_p [[0, I], [-I, 0]]`` gives ``K = U J U^T``, so every rotation used here has the form

    R = I + U Phi U^T,       Phi: (2 r_p, 2 r_p)

and ``z R = z + ((z U) Phi) U^T`` costs ``O(d_out r_p)`` per row; no ``d_out x d_out`` matrix is formed.

- ``taylor`` (the paper, default): ``R = I + K``, ``Phi = J``.
- ``exp``: ``R = exp(K) = I + U phi_1(J G) J U^T`` with ``G = U^T U`` and
  ``phi_1(X) = sum_k X^k / (k+1)!``, read off the exponential of the ``4 r_p`` block matrix
  ``[[X, I], [0, 0]]``.
- ``cayley``: ``R = (I - K/2)^{-1} (I + K/2)``; with ``M = J/2`` and Woodbury,
  ``Phi = M + (I + M G)(I - M G)^{-1} M``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

S_P_EPS = 1e-6


def s_p(C: Array, D: Array, initial_s_p: float) -> Array:
    """``s_p = min(1, initial_s_p / (||C||_F + ||D||_F + 1e-6))``; gradients flow through the norms."""
    return jnp.minimum(1.0, initial_s_p / (jnp.linalg.norm(C) + jnp.linalg.norm(D) + S_P_EPS))


def _j(r_p: int, scale: Array, dtype) -> Array:
    eye = jnp.eye(r_p, dtype=dtype)
    zero = jnp.zeros((r_p, r_p), dtype=dtype)
    return scale * jnp.block([[zero, eye], [-eye, zero]])


def core(C: Array, D: Array, sp: Array, kind: str = "taylor") -> tuple[Array, Array]:
    """``(U, Phi)`` with ``R = I + U Phi U^T`` for the scale ``sp = s_p``. ``C, D: (d_out, r_p)`` ->
    ``U: (d_out, 2 r_p)``, ``Phi: (2 r_p, 2 r_p)``."""
    r_p = C.shape[-1]
    U = jnp.concatenate([C, D], axis=-1)
    J = _j(r_p, sp, U.dtype)
    if kind == "taylor":
        return U, J
    G = U.T @ U
    n = 2 * r_p
    eye = jnp.eye(n, dtype=U.dtype)
    if kind == "exp":
        X = J @ G
        aug = jnp.block([[X, eye], [jnp.zeros((n, n), U.dtype), jnp.zeros((n, n), U.dtype)]])
        phi1 = jax.scipy.linalg.expm(aug)[:n, n:]
        return U, phi1 @ J
    if kind == "cayley":
        M = J / 2
        MG = M @ G
        return U, M + (eye + MG) @ jnp.linalg.solve(eye - MG, M)
    raise ValueError(f"unknown rotation {kind!r}; choose taylor, cayley or exp")


def rotation_core(C: Array, D: Array, initial_s_p: float, kind: str = "taylor") -> tuple[Array, Array]:
    """``(U, Phi)`` with ``R = I + U Phi U^T``. ``C, D: (d_out, r_p)`` -> ``U: (d_out, 2 r_p)``."""
    return core(C, D, s_p(C, D, initial_s_p), kind)


def taylor_term(zC: Array, zD: Array, C: Array, D: Array, sp: Array) -> Array:
    """``z K = s_p ((z C) D^T - (z D) C^T)`` from ``zC, zD: (..., r_p)``: two rank-``r_p`` products whose
    difference is exactly 0 when ``C == D`` (init)."""
    return sp * (zC @ D.T - zD @ C.T)


def rotate(z: Array, C: Array, D: Array, initial_s_p: float, kind: str = "taylor") -> Array:
    """``z R`` for ``z: (..., d_out)``: ``z + ((z U) Phi) U^T`` (for ``taylor``:
    ``z + s_p ((z C) D^T - (z D) C^T)``)."""
    C, D = C.astype(z.dtype), D.astype(z.dtype)
    sp = s_p(C, D, initial_s_p)
    if kind == "taylor":
        return z + taylor_term(z @ C, z @ D, C, D, sp)
    U, Phi = core(C, D, sp, kind)
    return z + ((z @ U) @ Phi) @ U.T


def rotation_matrix(C: Array, D: Array, initial_s_p: float, kind: str = "taylor") -> Array:
    """The dense ``R: (d_out, d_out)``; for analysis and tests only (``O(d_out^2)`` memory)."""
    U, Phi = rotation_core(C, D, initial_s_p, kind)
    return jnp.eye(U.shape[0], dtype=U.dtype) + U @ Phi @ U.T


def generator(C: Array, D: Array, initial_s_p: float) -> Array:
    """The dense skew-symmetric ``K = s_p (C D^T - D C^T): (d_out, d_out)``; for analysis and tests."""
    return s_p(C, D, initial_s_p) * (C @ D.T - D @ C.T)
