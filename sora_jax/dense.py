"""Activation-side execution: the adapted layer without the weight gradient ``dL/dW'``.

The same layer as :func:`sora_jax.apply_adapter` (SPEC section 2), for ``x: (N, d_in)``,
``y = x W`` (one frozen matmul) and ``u = s drop(x) A B``:

| method     | output                                   |
|------------|------------------------------------------|
| lora       | ``y + b + u``                            |
| dora       | ``(m / n) * (y + u) + b``                |
| prediag    | ``d * (y + b) + u``                      |
| pre_ortho  | ``(y + b) R + u``                        |
| post_ortho | ``(y + b + u) R``                        |
| sora       | ``(d * (y + b) + u) R``                  |

With LoRA dropout (``xd = drop(x)``, ``u = s xd A B``) DoRA is PEFT's (and the DoRA paper's code's)
``y + b + (m / n - 1) (xd W) + (m / n) u``: the magnitude's correction sees the dropped input too; without
dropout that is the table's form.

``z R = z + ((z U) Phi) U^T`` (``taylor``: ``z + s_p ((z C) D^T - (z D) C^T)``). DoRA's column norm
comes from the factors: ``n_j^2 = ||w_j||^2 + 2 s (W^T A B)_jj + s^2 ||(A B)_j||^2``, which costs
``O(r d_in d_out)`` once per step, not per token, and is a constant of the backward pass
(``stop_gradient``). With dropout 0 both paths agree to float32 rounding.

Speed (see experiments/PERF.md). The whole layer has a hand-written backward (:func:`jax.custom_vjp`)
whose gradients for ``A, B, m, d, C, D, s_p`` are all products of activations, never the
``(d_in, d_out)`` weight gradient ``x^T G`` that the weight path pays. It

- forms the effective weight ``W'`` (``O(d_in d_out (r + 2 r_p))``, in the forward and again in the
  backward rather than kept in between, never differentiated; float32 without LoRA dropout,
  ``fused=True``) so that the forward is one matmul
  ``x W' + b'`` and the input gradient one matmul ``G W'^T``, as in the frozen layer; the gradients of
  ``d`` and DoRA's ``m``, which need the frozen layer's own output, recover it from the kept output
  (:func:`_frozen_colsum`; the few worst-conditioned output features are computed exactly instead, and in a
  step with more ill-conditioned features than that, the whole frozen output, under ``lax.cond``);
- takes every thin product of ``x`` in one pass (``x [A, Z C, Z D]``, ``Z`` the rotation's input
  weight) and the LoRA and rotation terms of the output in one thin matmul;
- computes each thin weight gradient ``X^T G`` (``X: (N, k)``, ``G: (N, d)``, ``k`` = r or r_p) as
  ``(G^T X)^T`` behind an optimisation barrier: XLA's CPU backend runs the ``(d, k)``-output form of
  a contraction over the ``N`` rows 5-10x slower than the ``(k, d)``-output form, and its algebraic
  simplifier would otherwise fold the transpose back into the dot;
- stores only what the backward needs: the adapter's input ``x``, the ``(N, r)`` and ``(N, 2 r_p)``
  products, and the output for the methods whose gradient needs it (``d``; DoRA's ``m``); unfused,
  ``y = x W`` (DoRA: ``v = x (W + s A B)``) instead. A layer whose input is an activation's output
  (``input_act``, the FFN's output layer) keeps the pre-activation instead and recomputes the activation.

Exact rotations (``cayley``, ``exp``) take the plain autodiff form.

Pass the result of :func:`adapted_dense` as a sora-jax model's ``dense_fn``.
"""

from __future__ import annotations

import functools
import itertools
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sora_jax.activations import activation
from sora_jax.adapter import Adapter
from sora_jax.methods import colnorm, condition
from sora_jax.ops import default_dense
from sora_jax.recompute import after
from sora_jax.rotation import rotate, s_p

Array = jax.Array


def dora_norm(W: Array, A: Array, B: Array, s: float) -> Array:
    """``colnorm(W + s A B)`` from factors: ``W: (d_in, d_out)``, ``A: (d_in, r)``, ``B: (r, d_out)``.

    ``n_j^2 = ||w_j||^2 + 2 s sum_k (A^T W)_kj B_kj + s^2 sum_k B_kj (A^T A B)_kj``. Computed in float32.
    """
    W, A, B = (t.astype(jnp.float32) for t in (W, A, B))
    sq = jnp.sum(W * W, axis=0) + 2 * s * jnp.sum((A.T @ W) * B, axis=0) + s * s * _colnorm_sq_lowrank(A, B)
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def _colnorm_sq_lowrank(P: Array, M: Array) -> Array:
    """``colnorm(P M)^2`` for ``P: (d_in, k)``, ``M: (k, d_out)`` without forming ``P M``."""
    return jnp.sum(M * ((P.T @ P) @ M), axis=0)


def _colnorm_lowrank(P: Array, M: Array) -> Array:
    """``colnorm(P M)`` (clamped at 0 against rounding below it)."""
    return jnp.sqrt(jnp.maximum(_colnorm_sq_lowrank(P, M), 0.0))


# -- the layer with a hand-written backward ----------------------------------------------------------
def _tdot(a: Array, b: Array) -> Array:
    """``a^T b`` for ``a: (N, k)``, ``b: (N, d)`` -> ``(k, d)``: the fast orientation of a thin
    contraction over rows, kept from being re-associated by an optimisation barrier."""
    return jax.lax.optimization_barrier(jnp.dot(a.T, b))


ROTATING = ("pre_ortho", "post_ortho", "sora")


def _rot_rows(Z: Array, C: Array, D: Array, sp: Array) -> Array:
    """``Z R = Z + s_p ((Z C) D^T - (Z D) C^T)`` for ``Z: (..., d_out)`` (the Taylor rotation)."""
    return Z + sp * ((Z @ C) @ D.T - (Z @ D) @ C.T)


def _rotation_thin(method: str, W: Array, b: Array | None, lv: dict[str, Array]) -> tuple[Array, Array | None]:
    """``Z U`` and ``b_z``: the rotation's input ``z = x Z + b_z`` (``Z: (d_in, d_out)``: ``W`` (Pre-Ortho),
    ``W + s A B`` (Post-Ortho), ``W diag(d) + s A B`` (SORA)) times ``U = [C, D]: (d_out, 2 r_p)``, from the
    factors (``(d_in, 2 r_p)``, ``Z`` itself is never formed)."""
    U = jnp.concatenate([lv["C"], lv["D"]], axis=1)
    if method == "pre_ortho":
        return W @ U, b
    if method == "post_ortho":
        return W @ U + lv["A"] @ (lv["Bs"] @ U), b
    return W @ (lv["d"][:, None] * U) + lv["A"] @ (lv["Bs"] @ U), None if b is None else lv["d"] * b  # sora


def _conditioned(method: str, W: Array, b: Array | None, lv: dict[str, Array]) -> tuple[Array, Array | None]:
    """``(W', b')`` of SPEC section 2 (:func:`sora_jax.methods.condition`) from the layer's leaves
    (``Bs = s B``; DoRA's ``k = m / n``; ``sp``). ``W': (d_in, d_out)``, formed in
    ``O(d_in d_out (r + 2 r_p))``, never differentiated. With a rotation, ``Z R = Z + s_p ((Z C) D^T - (Z D) C^T)``
    is folded into one thin product: ``W' = W_0 + [A, s_p Z C, -s_p Z D] [Bs; D^T; C^T]`` (``W_0 = W diag(d)``
    for SORA, else ``W``; Pre-Ortho: ``W R + s A B`` with ``Z = W``), two passes over ``(d_in, d_out)``."""
    if method not in ROTATING:
        return condition(method, W, b, lv["A"] @ lv["Bs"], d=lv.get("d"), dora_scale=lambda _: lv["k"])
    C, D, sp = lv["C"], lv["D"], lv["sp"]
    r_p = C.shape[1]
    ZU, bz = _rotation_thin(method, W, b, lv)
    left = jnp.concatenate([lv["A"], sp * ZU[:, :r_p], -sp * ZU[:, r_p:]], axis=1)
    right = jnp.concatenate([lv["Bs"], D.T, C.T], axis=0)
    base = W * lv["d"] if method == "sora" else W
    return base + left @ right, None if bz is None else _rot_rows(bz, C, D, sp)


# the methods whose gradient needs the frozen layer's own output (``d``'s, DoRA's ``k``'s): the fused form
# keeps the layer output and recovers that gradient from it (:func:`_frozen_colsum`)
OUTPUT_KEPT = ("dora", "prediag", "sora")
KAPPA = 64.0  # the largest rounding-error amplification the recovery may have (6 of float32's 24 bits)
EXACT_COLUMNS = 8  # output features per layer whose frozen output is computed exactly (the worst-conditioned)


def _fused_forward(method: str, x: Array, W: Array, b: Array | None, lv: dict[str, Array], res: dict):
    """The forward with ``W'`` formed (``fused``): ``out = x W' + b'`` (one matmul) for every method, and
    one thin pass over ``x`` for ``h = x A``, with a rotation ``ac = z [C, D] = x (Z [C, D]) + b_z [C, D]``,
    and for :data:`OUTPUT_KEPT` methods the frozen output of the :data:`EXACT_COLUMNS` output features
    whose recovery from ``out`` is worst conditioned (:func:`recovery_kappa`); those methods keep ``x W'``
    (the output before its bias, which XLA keeps for the next operation anyway where that is elementwise)."""
    A = lv["A"]
    thin = [A]
    if method in ROTATING:
        ZU, bz = _rotation_thin(method, W, b, lv)  # (d_in, 2 r_p)
        thin.append(ZU)
    Weff, beff = _conditioned(method, W, b, lv)
    if method in OUTPUT_KEPT:
        kappa = recovery_kappa(method, {"W": W, **lv}, Weff)
        idx = jax.lax.top_k(kappa, min(EXACT_COLUMNS, kappa.shape[0]))[1]
        Vk = W[:, idx] + A @ lv["Bs"][:, idx] if method == "dora" else W[:, idx]  # (d_in, K)
        thin.append(Vk)
        res["idx"] = idx
        res["covered"] = (kappa <= KAPPA).at[idx].set(True)
    hz = x @ jnp.concatenate(thin, axis=1)
    widths = [t.shape[1] for t in thin]
    parts = jnp.split(hz, list(itertools.accumulate(widths))[:-1], axis=1)
    res["h"] = parts[0]
    if method in ROTATING:
        res["ac"] = parts[1] if bz is None else parts[1] + bz @ jnp.concatenate([lv["C"], lv["D"]], axis=1)
    if method in OUTPUT_KEPT:
        pk = parts[-1]
        res["p_idx"] = pk if b is None or method == "dora" else pk + b[res["idx"]]
    # W' is not kept: the backward forms it again (cheap next to its (d_in, d_out) memory)
    dot = x @ Weff
    if method in OUTPUT_KEPT:
        res["dot"] = dot
    return (dot if beff is None else dot + beff), res


def _frozen_colsum(
    method: str,
    G: Array,
    res: dict,
    hG: Array,
    acG: Array | None,
    beff: Array | None = None,
    x: Array | None = None,
) -> Array:
    """``colsum(G * p)`` with ``p = x W + b`` (Pre-Diag, SORA: ``d``'s gradient) or ``p = v = x (W + s A B)``
    (DoRA: ``k``'s gradient), ``G: (N, d_out)`` -> ``(d_out,)``; ``beff``: the effective bias ``b'``.

    Unfused, ``y = x W`` was kept. Fused, only the output was, and ``p`` is one step from it:

    - Pre-Diag: ``out = d * p + h Bs``, so ``d * colsum(G p) = colsum(G out) - colsum(Bs * h^T G)``;
    - SORA: ``out = z + s_p (a D^T - c C^T)`` with ``[a, c] = z [C, D]`` kept and ``z = d * p + h Bs``, so
      ``d * colsum(G p) = colsum(G out) - s_p colsum(a^T G * D^T - c^T G * C^T) - colsum(Bs * h^T G)``;
    - DoRA: ``out = k * v + b``, so ``k * colsum(G v) = colsum(G out) - colsum(G) b``;

    one reduction pass over ``G`` and ``out`` (``h^T G``, ``[a, c]^T G`` are the backward's anyway), then a
    division by ``d`` (``k``), which amplifies the rounding error of ``out`` by :func:`recovery_kappa`.
    The :data:`EXACT_COLUMNS` worst-conditioned features take ``p`` from the forward instead (``x W`` of
    those columns, in the forward's thin pass). If more features than that are ill-conditioned
    (``kappa_j >`` :data:`KAPPA`: a diagonal entry near 0, an update that dwarfs its frozen column, DoRA's
    ``m_j = 0``), that step computes ``p = x W`` (``+ b``; DoRA ``+ h Bs``) in full under :func:`jax.lax.cond`
    (``x: (N, d_in)``, the layer's input) and takes their gradients from it: exact, never NaN, at the cost of
    one frozen matmul in those steps only."""
    b, Bs = res["b"], res["Bs"]
    if "y" in res:  # unfused
        if method == "dora":
            return jnp.sum(G * res["y"], axis=0) + jnp.sum(Bs * hG, axis=0)
        return jnp.sum(G * (res["y"] if b is None else res["y"] + b), axis=0)
    q = jnp.sum(G * res["dot"], axis=0)  # colsum(G out), out = dot + b'
    if beff is not None:
        q = q + jnp.sum(G, axis=0) * beff
    scale = res["k"] if method == "dora" else res["d"]
    if method == "dora":
        known = 0.0 if b is None else jnp.sum(G, axis=0) * b
    else:
        known = jnp.sum(Bs * hG, axis=0)
        if method == "sora":
            C, D, sp = res["C"], res["D"], res["sp"]
            r_p = C.shape[1]
            known = known + sp * jnp.sum(acG[:r_p] * D.T - acG[r_p:] * C.T, axis=0)
    idx, covered = res["idx"], res["covered"]
    exact = jnp.sum(jnp.take(G, idx, axis=1) * res["p_idx"], axis=0)
    pG = ((q - known) / scale).at[idx].set(exact)

    def frozen_exact() -> Array:  # colsum(G p) from p itself: one more frozen matmul
        p = x @ res["W"]
        if method == "dora":
            p = p + res["h"] @ Bs
        elif b is not None:
            p = p + b
        return jnp.sum(G * p, axis=0)

    # a runtime branch: only the steps with more ill-conditioned features than exact columns take it
    full = jax.lax.cond(jnp.all(covered), lambda: jnp.zeros_like(pG), frozen_exact)
    return jnp.where(covered, pG, full)


def recovery_kappa(method: str, lv: dict[str, Array], Weff: Array) -> Array:
    """How much recovering the frozen output from the layer output amplifies rounding error, per output
    feature (``(d_out,)``; ``inf`` where it is impossible): ``kappa_j = (||W'_j|| + ||E_j||) / (|d_j| ||W_j||)``,
    ``E`` what :func:`_frozen_colsum` subtracts (``s A B``, and SORA's ``Z K``); DoRA: 1 where ``k_j != 0``.

    ``lv``: the layer's ``W (d_in, d_out)``, ``A``, ``Bs`` and ``d`` (with ``C, D, sp`` for SORA) or DoRA's
    ``k``; ``Weff``: the effective weight ``W'``."""
    if method == "dora":
        return jnp.where(lv["k"] != 0, 1.0, jnp.inf).astype(Weff.dtype)
    W, A, Bs, d = lv["W"], lv["A"], lv["Bs"], lv["d"]
    e = _colnorm_lowrank(A, Bs)
    if method == "sora":
        C, D, sp = lv["C"], lv["D"], lv["sp"]
        ZU = _rotation_thin(method, W, None, lv)[0]  # Z U, Z = W diag(d) + A Bs
        e = e + _colnorm_lowrank(ZU, sp * jnp.concatenate([D.T, -C.T], axis=0))
    num = colnorm(Weff) + e
    den = jnp.abs(d) * colnorm(W)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _layer(
    method: str, fused: bool, act: str | None, x: Array, W: Array, b: Array | None, xd: Array | None,
    lv: dict[str, Array]
) -> Array:
    """One adapted layer (Taylor rotation) on 2-D activations ``x, xd: (N, d_in)`` -> ``(N, d_out)``.

    ``xd`` is the LoRA branch's input (``x`` after dropout; ``None``: ``x`` itself); ``lv`` holds ``A (d_in, r)``,
    ``Bs = s B (r, d_out)`` and, per method, ``d (d_out,)``, ``k = m / n (d_out,)`` (DoRA),
    ``C, D (d_out, r_p)`` and ``sp`` (scalar ``s_p``). ``fused`` (needs ``xd is None``): form the
    effective weight ``W'`` once per step, take the input gradient as ``G W'^T`` (one matmul, as the
    frozen layer) and the output as ``x W' + b'``. ``act`` (an activation's name, or ``None``): the layer's
    input is ``act(x)``; ``x``, the pre-activation, is what the backward keeps, and it recomputes ``act(x)``
    when it needs it. Undifferentiated (inference), a fused layer is always ``x W' + b'``: the cost of the
    merged model plus forming ``W'``."""
    if fused:
        x = x if act is None else activation(act)(x)
        Weff, beff = _conditioned(method, W, b, lv)
        return x @ Weff if beff is None else x @ Weff + beff
    return _layer_fwd(method, fused, act, x, W, b, xd, lv)[0]


def _layer_fwd(
    method: str, fused: bool, act: str | None, x: Array, W: Array, b: Array | None, xd: Array | None,
    lv: dict[str, Array]
):
    res: dict[str, Array | None] = {"x": x, "W": W, "b": b, "xd": xd, **lv}
    if act is not None:
        x = activation(act)(x)
    if fused:
        return _fused_forward(method, x, W, b, lv, res)
    Bs = lv["Bs"]
    h = res["h"] = (x if xd is None else xd) @ lv["A"]
    y = x @ W
    u = h @ Bs
    p = y if b is None else y + b
    if method == "lora":
        return p + u, res
    res["y"] = y
    if method == "dora":
        k = lv["k"]
        if xd is None:
            out = k * (y + u)
        else:  # PEFT's form: y + (k - 1) xd W + k u (dropout on the magnitude's input as well)
            yd = res["y"] = xd @ W
            out = y + (k - 1) * yd + k * u
        return (out if b is None else out + b), res
    if method == "prediag":
        return lv["d"] * p + u, res
    # rotations: a = z C, c = z D from the factors of z (z itself is never an input of a matmul)
    C, D, sp = lv["C"], lv["D"], lv["sp"]
    U = jnp.concatenate([C, D], axis=1)  # (d_out, 2 r_p)
    if method == "sora":
        z = lv["d"] * p + u
        ac = y @ (lv["d"][:, None] * U) + h @ (Bs @ U)
        if b is not None:
            ac = ac + (lv["d"] * b) @ U
    else:
        z = p if method == "pre_ortho" else p + u
        ac = y @ U
        if b is not None:
            ac = ac + b @ U
        if method == "post_ortho":
            ac = ac + h @ (Bs @ U)
    r_p = C.shape[1]
    res["ac"] = ac
    out = z + sp * (ac[:, :r_p] @ D.T - ac[:, r_p:] @ C.T)
    return (out + u if method == "pre_ortho" else out), res


_LEAVES = ("A", "Bs", "d", "k", "C", "D", "sp")  # the names of a layer's adapter leaves ``lv``


def _layer_bwd(method: str, fused: bool, act: str | None, res: dict[str, Array | None], G: Array):
    x, W, b, xd, h, A, Bs = (res[k] for k in ("x", "W", "b", "xd", "h", "A", "Bs"))
    if act is not None:  # the input again, from the kept pre-activation
        x, act_vjp = jax.vjp(activation(act), after(x, G))
    grads: dict[str, Array] = {}
    Weff, beff = None, None
    dyd = None  # DoRA with dropout: the cotangent of ``xd W``
    if fused:  # W' formed again from leaves tied to G (not the forward's W', kept alive until here)
        lvt = {k: after(res[k], G) for k in _LEAVES if k in res}
        Weff, beff = _conditioned(method, W, b, lvt)
    if method in ROTATING:
        C, D, sp, ac = res["C"], res["D"], res["sp"], res["ac"]
        r_p = C.shape[1]
        first = G @ jnp.concatenate([D, C, Bs.T], axis=1)  # one pass over G: [G D, G C, G Bs^T]
        GU, GBt = first[:, : 2 * r_p], first[:, 2 * r_p :]
        Q = sp * jnp.concatenate([C.T, -D.T], axis=0)  # (2 r_p, d_out): G R^T = G + GU Q
        second = _tdot(jnp.concatenate([ac, h], axis=1), G)  # one pass over G: [a^T G; c^T G; h^T G]
        acG, hG = second[: 2 * r_p], second[2 * r_p :]
        dh = GBt if method == "pre_ortho" else GBt + GU @ (Q @ Bs.T)
        # GU^T p (p = x W + b) from GU^T x, in the same pass over x as A's gradient (dh^T x)
        if xd is None:
            both = _tdot(jnp.concatenate([dh, GU], axis=1), x)
            dAt, GUx = both[: dh.shape[1]], both[dh.shape[1] :]
        else:
            dAt, GUx = _tdot(dh, xd), _tdot(GU, x)
        grads["A"] = dAt.T
        GUp = GUx @ W
        if b is not None:
            GUp = GUp + jnp.sum(GU, axis=0)[:, None] * b[None, :]
        hGU = _tdot(h, GU)  # (r, 2 r_p)
        # GU^T z for the rotation input z
        if method == "pre_ortho":
            GUz = GUp
        elif method == "post_ortho":
            GUz = GUp + hGU.T @ Bs
        else:
            GUz = GUp * res["d"] + hGU.T @ Bs
        grads["C"] = sp * (GUz[:r_p] - acG[r_p:]).T
        grads["D"] = sp * (acG[:r_p] - GUz[r_p:]).T
        grads["sp"] = (jnp.sum(GU[:, :r_p] * ac[:, :r_p]) - jnp.sum(GU[:, r_p:] * ac[:, r_p:])).astype(sp.dtype)
        if method == "pre_ortho":  # dp = G R^T, du = G
            dx = G @ W.T + GU @ (Q @ W.T)
            grads["Bs"] = hG
            dp = G + GU @ Q
        else:  # du = dz = G R^T; dp = dz (post_ortho) or d * dz (sora)
            grads["Bs"] = hG + hGU @ Q
            if method == "post_ortho":
                dx = G @ W.T + GU @ (Q @ W.T)
                dp = G + GU @ Q
            else:
                d = res["d"]
                dx = G @ (W * d).T + GU @ ((Q * d) @ W.T)
                grads["d"] = _frozen_colsum(method, G, res, hG, acG, beff, x) + jnp.sum(Q * GUp, axis=0)
                dp = d * (G + GU @ Q)
    else:
        hG = _tdot(h, G)
        if method == "dora":
            k = res["k"]
            dh = G @ (Bs * k).T
            grads["Bs"] = hG * k
            grads["k"] = _frozen_colsum(method, G, res, hG, None, beff, x)
            if xd is None:
                dx = G @ (W * k).T
                dp = k * G  # cotangent of y; the bias gets G
            else:  # out = y + (k - 1) xd W + k u: y's cotangent is G, xd W's (k - 1) G
                dx = G @ W.T
                dp = G
                dyd = (k - 1) * G
        else:
            dh = G @ Bs.T
            grads["Bs"] = hG
            if method == "prediag":
                d = res["d"]
                dx = G @ (W * d).T
                grads["d"] = _frozen_colsum(method, G, res, hG, None, beff, x)
                dp = d * G
            else:
                dx = G @ W.T
                dp = G
        grads["A"] = _tdot(dh, x if xd is None else xd).T  # (d_in, r)
    if fused:  # the input gradient through the effective weight: one matmul, as in the frozen layer
        dx, dxd = G @ Weff.T, None
    else:
        dxd = dh @ A.T
        if dyd is not None:
            dxd = dxd + dyd @ W.T
        if xd is None:
            dx, dxd = dx + dxd, None
    # cotangents of the frozen kernel and bias: dead code unless they are differentiated
    dW = jnp.dot(x.T, dp)
    if dyd is not None:
        dW = dW + jnp.dot(xd.T, dyd)
    db = None if b is None else jnp.sum(G if method == "dora" else dp, axis=0)
    if act is not None:
        dx = act_vjp(dx)[0]
    return dx, dW, db, dxd, {k: grads[k].astype(res[k].dtype) for k in _LEAVES if k in res}


_layer.defvjp(_layer_fwd, _layer_bwd)


# -- one adapted layer ---------------------------------------------------------------------------------
def _dropout(x: Array, rate: float, key: Array | None) -> Array:
    if key is None or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def _adapted_layer_autodiff(
    y: Array, b: Array | None, lv: dict[str, Array], config, scaling: float, xd: Array
) -> Array:
    """The plain autodiff form (any rotation kind); ``y = x W: (N, d_out)``, ``xd: (N, d_in)``."""
    u = scaling * ((xd @ lv["A"]) @ lv["B"])

    def rot(z: Array) -> Array:
        return rotate(z, lv["C"], lv["D"], config.initial_s_p, config.rotation)

    z = y if b is None else y + b
    if config.has_diag:
        z = lv["d"] * z
    if config.method == "pre_ortho":
        z = rot(z)
    z = z + u
    if config.method in ("sora", "post_ortho"):
        z = rot(z)
    return z


def layer_leaves(kernel: Array, leaves: dict[str, Array], config, scaling: float, dtype) -> dict[str, Array]:
    """The leaves in the form the layer uses: ``A``, ``Bs = s B`` and, per method, ``k = m / n`` (DoRA, ``n``
    from the factors, a constant), ``d``, ``C, D`` and ``sp = s_p(C, D)``; in ``dtype``."""
    lv = {k: v.astype(dtype) for k, v in leaves.items()}
    tail = {"A": lv["A"], "Bs": scaling * lv["B"]}
    if config.method == "dora":
        n = jax.lax.stop_gradient(dora_norm(kernel, leaves["A"], leaves["B"], scaling))
        tail["k"] = (leaves["m"].astype(jnp.float32) / n).astype(dtype)
    if config.has_diag:
        tail["d"] = lv["d"]
    if config.has_rotation:
        tail.update(C=lv["C"], D=lv["D"], sp=s_p(lv["C"], lv["D"], config.initial_s_p))
    return tail


def adapted_layer(
    x: Array,
    kernel: Array,
    bias: Array | None,
    leaves: dict[str, Array],
    config,
    scaling: float,
    dropout_key: Array | None = None,
    fused: bool | None = None,
    input_act: str | None = None,
) -> Array:
    """One adapted dense layer on activations. ``x: (..., d_in)``, ``kernel: (d_in, d_out)`` -> ``(..., d_out)``.

    ``fused``: form ``W'`` once per step (see the module docstring); ``False`` keeps every adapter term on
    activations; ``None`` chooses by shape (:func:`fuse_pays`). Both compute the same function.
    ``input_act``: the layer's input is ``act(x)`` for that activation (``sora_jax.models.ACTIVATIONS``);
    the backward keeps ``x`` (which the model keeps anyway for the activation's derivative) and recomputes
    ``act(x)``, instead of keeping a second tensor (``(N, 4 hidden)`` in a transformer's FFN).

    Precision: the layer computes in the wider of the activations' and the adapter leaves' dtypes (bfloat16
    activations with a float32 adapter: float32, so that a small rotation or a diagonal near 1 is not lost
    to bfloat16 rounding) and returns the activations' dtype, as PEFT does."""
    lead = x.shape[:-1]
    out_dt = x.dtype
    dt = functools.reduce(jnp.promote_types, [v.dtype for v in leaves.values()], out_dt)
    x = x.reshape(-1, x.shape[-1]).astype(dt)
    W = kernel.astype(dt)
    b = None if bias is None else bias.astype(dt)
    method = config.method
    dropped = dropout_key is not None and config.lora_dropout > 0.0
    autodiff = config.has_rotation and config.rotation != "taylor"  # exact rotations: plain autodiff
    if input_act is not None and (dropped or autodiff):  # the activation is applied here, kept by autodiff
        x, input_act = activation(input_act)(x), None
    if autodiff:
        xd = _dropout(x, config.lora_dropout, dropout_key)
        lv = {k: v.astype(dt) for k, v in leaves.items()}
        out = _adapted_layer_autodiff(jnp.dot(x, W), b, lv, config, scaling, xd)
    else:
        tail = layer_leaves(kernel, leaves, config, scaling, dt)
        xd = _dropout(x, config.lora_dropout, dropout_key) if dropped else None
        if fused is None:
            fused = fuse_pays(x.shape[0], *W.shape)
        # forming W' is exact only in float32 (in bfloat16 a small update would round away)
        fused = fused and xd is None and dt == jnp.float32
        out = _layer(method, fused, input_act, x, W, b, xd, tail)
    return out.reshape(*lead, out.shape[-1]).astype(out_dt)


def fuse_pays(rows: int, d_in: int, d_out: int) -> bool:
    """Whether forming ``W'`` beats the all-activation form for ``rows`` tokens (a static, per-layer choice).

    Beyond the frozen layer, the fused form costs ``4 d_in d_out r`` (``W' = W + s A B`` formed in the
    forward and again in the backward) plus ``4 N r (d_in + d_out)`` in thin products; the unfused form
    ``6 N r (d_in + d_out)``. So fusing pays when ``N > 2 d_in d_out / (d_in + d_out)``: from 614 tokens for a
    384 x 1536 layer, 3277 for 2048 x 8192 (experiments/PERF.md, change 11)."""
    return rows * (d_in + d_out) > 2 * d_in * d_out


def adapted_dense(
    adapter: Adapter, dropout_rng: Array | None = None, fused: bool | None = None
) -> Callable[..., Array]:
    """A model ``dense_fn(path, x, kernel, bias)`` that runs ``adapter`` on activations.

    Modules without adapter leaves compute ``x W + b``. The model may pass ``input_act`` (the name of the
    activation to apply to ``x`` first; see :func:`adapted_layer`). ``dropout_rng``: a key for LoRA dropout
    (``config.lora_dropout``), folded with each module's path; ``None`` disables dropout (evaluation).
    ``fused``: see :func:`adapted_layer` (``None``, the default, chooses per layer by shape; both forms compute
    the same function).
    In a model with scanned layers (``sora_jax.models.common.scan_blocks``) a block passes its index
    ``layer`` and its own ``(d_in, d_out)`` kernel slice; the module's adapter leaves are stacked
    ``(L, ...)`` (``AdapterConfig.kernel_axes`` role ``"sio"``) and the block's slice is taken here.
    """
    config = adapter.config

    def dense_fn(
        path: tuple[str, ...],
        x: Array,
        kernel: Array,
        bias: Array | None,
        input_act: str | None = None,
        layer: Array | None = None,
    ) -> Array:
        key = "/".join(path)
        leaves = adapter.layers.get(key)
        if leaves is None:
            return default_dense(path, x, kernel, bias, input_act)
        if layer is not None:
            leaves = {k: v[layer] for k, v in leaves.items()}
        if kernel.ndim != 2:
            raise ValueError(f"activation path needs a 2-D kernel at {key!r}, got {kernel.shape}")
        k = None if dropout_rng is None else jax.random.fold_in(dropout_rng, zlib.crc32(key.encode()))
        if k is not None and layer is not None:
            k = jax.random.fold_in(k, layer)
        return adapted_layer(x, kernel, bias, leaves, config, config.scaling_for(key), k, fused, input_act)

    return dense_fn
