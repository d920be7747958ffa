"""Activation-side execution: the adapted layer without the weight gradient ``dL/dW'``.

The same layer as :func:`sora_jax.apply_adapter` (docs/spec.md section 2), for ``x: (N, d_in)``,
``y = x W`` (one frozen matmul) and ``u = s drop(x) A B``:

| method     | output                                   |
|------------|------------------------------------------|
| lora       | ``y + b + u``                            |
| dora       | ``(m / n) * (y + u) + b``                |
| prediag    | ``d * (y + b) + u``                      |
| pre_ortho  | ``(y + b) R + u``                        |
| post_ortho | ``(y + b + u) R``                        |
| sora       | ``(d * (y + b) + u) R``                  |
| post_diag  | ``v * (y + b + u)``                      |

in general ``T_post(T_pre(y + b) + u)`` (DoRA: ``T_post(y + u) + b``).

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
  a diagonal (``d``, DoRA's ``m``), which need the frozen layer's own output, recover it from the kept output
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

The layer is written once over the conditioning maps' form ``z T = z * scale + (z L) Rt``
(:mod:`sora_jax.conditioning`): the backward takes the gradients of each map's ``scale``, ``L`` and ``Rt``
from the products above and hands them to :func:`jax.vjp` of the map's ``factors`` for its own leaves, so
every method and rotation kind (``taylor``, ``cayley``, ``exp``) runs the same code.

Pass the result of :func:`adapted_dense` as a sora-jax model's ``dense_fn``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sora_jax import methods
from sora_jax.adapter import Adapter, check_compatible, module_key, vmap_lead
from sora_jax.conditioning import Factors, Map, Method, colnorm
from sora_jax.dropout import dropout
from sora_jax.ops import InputNorm, default_dense, input_parts, layer_input
from sora_jax.recompute import after

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


# -- the maps' factors on thin matrices -----------------------------------------------------------------
def _rows(f: Factors, M: Array) -> Array:
    """``M T`` for a thin ``M: (k, d_out)`` (``T = diag(scale) + L Rt``)."""
    out = M if f.scale is None else M * f.scale
    return out if f.L is None else out + (M @ f.L) @ f.Rt


def _rows_t(f: Factors, M: Array) -> Array:
    """``M T^T`` for a thin ``M: (k, d_out)``."""
    out = M if f.scale is None else M * f.scale
    return out if f.L is None else out + (M @ f.Rt.T) @ f.L.T


def _left(f: Factors, M: Array) -> Array:
    """``T M`` for ``M: (d_out, k)`` (so that ``(z T) M = z (T M)``)."""
    out = M if f.scale is None else f.scale[:, None] * M
    return out if f.L is None else out + f.L @ (f.Rt @ M)


def _scale(*fs: Factors) -> Array | None:
    """The product of the maps' diagonals (``None``: none has one)."""
    out = None
    for f in fs:
        if f.scale is not None:
            out = f.scale if out is None else out * f.scale
    return out


def _colsum_rank(tG: Array, Rt: Array) -> Array:
    """``colsum(G * (t Rt))`` from ``tG = t^T G: (k, d_out)``."""
    return jnp.sum(tG * Rt, axis=0)


# -- the layer with a hand-written backward ----------------------------------------------------------
def _tdot(a: Array, b: Array) -> Array:
    """``a^T b`` for ``a: (N, k)``, ``b: (N, d)`` -> ``(k, d)``: the fast orientation of a thin
    contraction over rows, kept from being re-associated by an optimisation barrier."""
    return jax.lax.optimization_barrier(jnp.dot(a.T, b))


def _split(t: Array, widths: list[int], axis: int = -1) -> list[Array]:
    """``t`` cut along ``axis`` into pieces of the given widths (a width may be 0)."""
    return jnp.split(t, list(itertools.accumulate(widths))[:-1], axis=axis)


KAPPA = 64.0  # the largest rounding-error amplification the recovery may have (6 of float32's 24 bits)
EXACT_COLUMNS = 8  # output features per layer whose frozen output is computed exactly (the worst-conditioned)


class Stages(NamedTuple):
    """A layer's two maps with their parameters and factors."""

    pre: Map
    post: Map
    pp: dict[str, Array]
    pq: dict[str, Array]
    fp: Factors
    fq: Factors


def _stages(m: Method, lv: dict[str, Array]) -> Stages:
    pp = {k: lv[k] for k in m.pre.param_names}
    pq = {k: lv[k] for k in m.post.param_names}
    return Stages(m.pre, m.post, pp, pq, m.pre.factors(pp), m.post.factors(pq))


def _target(m: Method) -> str | None:
    """Which map's diagonal needs the frozen output's column sums (``"pre"``, ``"post"``), or ``None``."""
    return "post" if m.post.scaled else "pre" if m.pre.scaled else None


def fusable(m: Method) -> bool:
    """Whether the fused form can recover the diagonal's gradient from the layer output: at most one of the
    two maps has a diagonal, and a ``T_post`` diagonal has no low-rank part."""
    return not (m.pre.scaled and m.post.scaled) and not (m.post.scaled and m.post.low_rank)


def _biases(st: Stages, b: Array | None) -> tuple[Array | None, Array | None]:
    """``(b_in, b_out)``: the bias inside ``T_pre``'s input ``p = x W + b_in``, and the one added to the output
    (``T_pre(b)``, for a ``T_post`` that leaves the bias alone: DoRA)."""
    if b is None or st.post.conditions_bias:
        return b, None
    return None, st.pre.apply(b, st.pp, st.fp)


def _weight(m: Method, W: Array, b: Array | None, lv: dict[str, Array]) -> tuple[Array, Array | None]:
    """``(W', b')`` from the layer's params (``Bs = s B``). ``W': (d_in, d_out)``, formed in
    ``O(d_in d_out (r + k))`` and never differentiated: the low-rank parts of both maps and ``A Bs`` are
    one thin product, ``W' = W diag(scale) + [A, W L_pre, Z L_post] [Bs; Rt_pre; Rt_post]`` (``Z`` the
    input of ``T_post``, its product with ``L_post`` taken from the factors), two passes over
    ``(d_in, d_out)``; a ``T_post`` diagonal scales the sum."""
    st = _stages(m, lv)
    A, Bs = lv["A"], lv["Bs"]
    left, right = [A], [Bs]
    if st.fp.L is not None:
        left.append(W @ st.fp.L)
        right.append(st.fp.Rt)
    if st.fq.L is not None:
        left.append(W @ _left(st.fp, st.fq.L) + A @ (Bs @ st.fq.L))
        right.append(st.fq.Rt)
    base = W if st.fp.scale is None else W * st.fp.scale
    Weff = base + jnp.concatenate(left, axis=1) @ jnp.concatenate(right, axis=0)
    if st.fq.scale is not None:
        Weff = Weff * st.fq.scale
    b_in, b_out = _biases(st, b)
    if b_in is not None:
        b_out = st.post.apply(st.pre.apply(b_in, st.pp, st.fp), st.pq, st.fq)
    return Weff, b_out


def recovery_kappa(method: str | Method, lv: dict[str, Array], Weff: Array) -> Array:
    """How much recovering the frozen output from the layer output amplifies rounding error, per output
    feature (``(d_out,)``; ``inf`` where it is impossible): for a ``T_pre`` diagonal ``d``,
    ``kappa_j = (||W'_j|| + ||E_j||) / (|d_j| ||W_j||)``, ``E`` what :func:`_layer_bwd` subtracts (``s A B``
    and the maps' low-rank terms); for a ``T_post`` diagonal (DoRA's ``k``): 1 where it is not 0.

    ``lv``: the layer's ``W (d_in, d_out)``, ``A``, ``Bs`` and the maps' params; ``Weff``: ``W'``."""
    m = methods.TABLE[method] if isinstance(method, str) else method
    st = _stages(m, {k: v for k, v in lv.items() if k != "W"})
    if _target(m) == "post":
        return jnp.where(st.fq.scale != 0, 1.0, jnp.inf).astype(Weff.dtype)
    W, A, Bs = lv["W"], lv["A"], lv["Bs"]
    e = _colnorm_lowrank(A, Bs)
    if st.fq.L is not None:
        e = e + _colnorm_lowrank(W @ _left(st.fp, st.fq.L) + A @ (Bs @ st.fq.L), st.fq.Rt)
    if st.fp.L is not None:
        e = e + _colnorm_lowrank(W @ st.fp.L, st.fp.Rt)
    num = colnorm(Weff) + e
    den = jnp.abs(st.fp.scale) * colnorm(W)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.inf)


class Saved(NamedTuple):
    """What the forward keeps for :func:`_layer_bwd` (``None``: not kept for this method or form)."""

    x: Any  # (..., d_in): the layer's input as the caller passed it (the pre-activation with an activation; a
    # gated input's two factors ``(u, gate)``; a norm's input and parameter ``(x, scale)``)
    W: Array  # (d_in, d_out)
    b: Array | None  # (d_out,)
    xd: Array | None  # (..., d_in): the LoRA branch's input after dropout
    lv: dict[str, Array]  # the layer's params: A, Bs and the maps'
    h: Array  # (N, r): xd A
    t_pre: Array | None  # (N, k_pre): p L_pre, p = x W + b_in the input of T_pre
    t_post: Array | None  # (N, k_post): z L_post, z = T_pre(p) + h Bs the input of T_post
    y: Array | None  # unfused: the frozen product entering p (x W; DoRA with dropout: xd W)
    dot: Array | None  # fused: x W' (the returned array itself when that is x W'), for the recovery of colsums
    idx: Array | None  # fused: the EXACT_COLUMNS output features computed exactly
    covered: Array | None  # fused: (d_out,) bool, the features whose recovery is well conditioned
    t_idx: Array | None  # fused: (N, EXACT_COLUMNS): the diagonal's input in those features


def _bypass(m: Method, xd: Array | None) -> bool:
    """DoRA with LoRA dropout (PEFT's form): ``T_post``'s frozen input comes from ``xd``, ``(x - xd) W``
    bypasses it."""
    return xd is not None and m.post.frozen_input_dropped


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _layer(
    method: Method, fused: bool, pre: Callable | None, x: Any, W: Array, b: Array | None, xd: Array | None,
    lv: dict[str, Array]
) -> Array:
    """One adapted layer on activations ``x, xd: (..., d_in)`` -> ``(..., d_out)``, computed on ``(N, d_in)``
    (flattened and cast to ``W``'s dtype inside: the backward keeps the caller's own ``x``, so the layers
    that read one input (q, k and v) keep one array, not a flattened copy each).

    ``xd`` is the LoRA branch's input (``x`` after dropout; ``None``: ``x`` itself); ``lv`` holds ``A (d_in, r)``,
    ``Bs = s B (r, d_out)`` and the maps' params (``d``, DoRA's ``k = m / n``, ``C, D, sp``). ``fused`` (needs
    ``xd is None``): form the effective weight ``W'`` once per step, take the input gradient as ``G W'^T``
    (one matmul, as the frozen layer) and the output as ``x W' + b'``. ``pre`` (a hashable function, or
    ``None``): the layer's input is ``pre(x)`` (an activation of the pre-activation ``x``), or ``pre(*x)`` for a
    tuple ``x`` (a gated MLP's ``(u, gate)``, a norm's ``(x, scale)``); ``x`` is what the backward keeps, and it
    recomputes the input when it needs it. Undifferentiated (inference), a fused layer is always
    ``x W' + b'``: the cost of the merged model plus forming ``W'``."""
    if fused:
        x2 = _input(pre, _flat(x, W.dtype))
        Weff, beff = _weight(method, W, b, lv)
        out = x2 @ Weff if beff is None else x2 @ Weff + beff
        return out.reshape(*_lead(x), out.shape[-1])
    return _layer_fwd(method, fused, pre, x, W, b, xd, lv)[0]


def _flat(x: Any, dtype) -> Any:
    """``(..., d) -> (N, d)`` in ``dtype`` (XLA's CPU backend runs thin matmuls on 3-D arrays much slower);
    each array of a tuple input (a norm's ``scale (d,)`` becomes ``(1, d)``)."""
    return jax.tree.map(lambda v: v.reshape(-1, v.shape[-1]).astype(dtype), x)


def _lead(x: Any) -> tuple[int, ...]:
    """The batch shape of the layer's input (of a tuple input's first array)."""
    return (x[0] if isinstance(x, tuple) else x).shape[:-1]


def _input(pre: Callable | None, x: Any) -> Array:
    """The layer's input from what the caller passed: ``x``, ``pre(x)``, or ``pre(*x)`` for a tuple."""
    if pre is None:
        return x
    return pre(*x) if isinstance(x, tuple) else pre(x)


def _fused_forward(m: Method, x: Array, W: Array, b: Array | None, lv: dict[str, Array], saved: dict):
    """The forward with ``W'`` formed (``fused``): ``out = x W' + b'`` (one matmul), and one thin pass over
    ``x`` for ``h = x A``, the maps' ``p L_pre`` and ``z L_post`` (from ``x (W L_pre)``, ``x (Z L_post)``) and,
    for a method with a diagonal, the diagonal's input in the :data:`EXACT_COLUMNS` output features whose
    recovery from ``out`` is worst conditioned (:func:`recovery_kappa`); those methods keep ``x W'`` (the
    output before its bias, which XLA keeps for the next operation anyway where that is elementwise)."""
    st = _stages(m, lv)
    A, Bs = lv["A"], lv["Bs"]
    b_in, _ = _biases(st, b)
    thin = [A]
    if st.fp.L is not None:
        thin.append(W @ st.fp.L)
    if st.fq.L is not None:
        thin.append(W @ _left(st.fp, st.fq.L) + A @ (Bs @ st.fq.L))
    Weff, beff = _weight(m, W, b, lv)
    target = _target(m)
    if target is not None:
        kappa = recovery_kappa(m, {"W": W, **lv}, Weff)
        idx = jax.lax.top_k(kappa, min(EXACT_COLUMNS, kappa.shape[0]))[1]
        Vk = W[:, idx]
        if target == "post":  # the columns of Z = T_pre(W) + A Bs
            Vk = st.pre.apply(W, st.pp, st.fp)[:, idx] + A @ Bs[:, idx]
        thin.append(Vk)
        saved.update(idx=idx, covered=(kappa <= KAPPA).at[idx].set(True))
    parts = _split(x @ jnp.concatenate(thin, axis=1), [t.shape[1] for t in thin])
    saved["h"] = parts.pop(0)
    bz = None if b_in is None else st.pre.apply(b_in, st.pp, st.fp)  # the bias inside z
    if st.fp.L is not None:
        t = parts.pop(0)
        saved["t_pre"] = t if b_in is None else t + b_in @ st.fp.L
    if st.fq.L is not None:
        t = parts.pop(0)
        saved["t_post"] = t if bz is None else t + bz @ st.fq.L
    if target is not None:
        bt = b_in if target == "pre" else bz
        saved["t_idx"] = parts[0] if bt is None else parts[0] + bt[saved["idx"]]
    # W' is not kept: the backward forms it again (cheap next to its (d_in, d_out) memory)
    dot = x @ Weff
    if target is not None:
        saved["dot"] = dot
    return (dot if beff is None else dot + beff), saved


def _layer_fwd(
    method: Method, fused: bool, pre: Callable | None, x: Any, W: Array, b: Array | None, xd: Array | None,
    lv: dict[str, Array]
):
    saved: dict = {"x": x, "W": W, "b": b, "xd": xd, "lv": lv}
    lead = _lead(x)
    x = _input(pre, _flat(x, W.dtype))
    xd = None if xd is None else _flat(xd, W.dtype)
    if fused:
        out, saved = _fused_forward(method, x, W, b, lv, saved)
    else:
        st = _stages(method, lv)
        b_in, b_out = _biases(st, b)
        h = saved["h"] = (x if xd is None else xd) @ lv["A"]
        y = x @ W
        bypass = _bypass(method, xd)
        yp = xd @ W if bypass else y
        p = yp if b_in is None else yp + b_in
        if st.fp.L is not None:
            saved["t_pre"] = p @ st.fp.L
        z = st.pre.apply(p, st.pp, st.fp, saved.get("t_pre")) + h @ lv["Bs"]
        if st.fq.L is not None:
            saved["t_post"] = z @ st.fq.L
        out = st.post.apply(z, st.pq, st.fq, saved.get("t_post"))
        if bypass:
            out = out + (y - yp)
        if b_out is not None:
            out = out + b_out
        if _target(method) is not None:
            saved["y"] = yp
    flat, out = out, out.reshape(*lead, out.shape[-1])
    if saved.get("dot") is flat:  # the output is x W' itself (no bias): keep the array returned, which
        saved["dot"] = out  # the next operation may keep too (one stacked copy, not two, under nn.scan)
    return out, Saved(**{f: saved.get(f) for f in Saved._fields})


def _frozen_colsum(m: Method, st: Stages, res: Saved, G: Array, x: Array, hG: Array, tpG: Array | None,
                   tqG: Array | None, beff: Array | None) -> Array:
    """``colsum(G * t)``, ``G: (N, d_out)`` -> ``(d_out,)``, for ``t`` the input of the map with the diagonal:
    ``p = x W + b_in`` (``T_pre``: Pre-Diag, SORA) or ``z = T_pre(p) + h Bs`` (``T_post``: DoRA's ``k``).
    ``hG = h^T G``, ``tpG = t_pre^T G``, ``tqG = t_post^T G`` (the backward's anyway).

    Unfused, the frozen product was kept. Fused, only the output ``out = x W' + b'`` was, and ``t`` is a few
    steps from it, each either a subtraction of a known low-rank term (``colsum(G * (t_q Rt_q)) =
    colsum(tqG * Rt_q)``, ``colsum(G * h Bs) = colsum(hG * Bs)``) or the division by the diagonal, which
    amplifies the rounding error of ``out`` by :func:`recovery_kappa`:

    - Pre-Diag: ``out = d * p + h Bs``: ``d * colsum(G p) = colsum(G out) - colsum(Bs * h^T G)``;
    - SORA: ``out = z + (z L) Rt`` and ``z = d * p + h Bs``: subtract both terms, divide by ``d``;
    - DoRA: ``out = k * z + b``: ``k * colsum(G z) = colsum(G (out - b))``.

    The :data:`EXACT_COLUMNS` worst-conditioned features take ``t`` from the forward instead (``x W`` of those
    columns, in the forward's thin pass). If more features than that are ill-conditioned (``kappa_j >``
    :data:`KAPPA`: a diagonal entry near 0, an update that dwarfs its frozen column, DoRA's ``m_j = 0``), that
    step computes ``t`` in full under :func:`jax.lax.cond` from ``x: (N, d_in)``, the layer's input, and takes
    their gradients from it: exact, never NaN, at the cost of one frozen matmul in those steps only."""
    target = _target(m)
    b_in, _ = _biases(st, res.b)
    Bs = res.lv["Bs"]
    if res.y is not None:  # unfused
        cp = jnp.sum(G * (res.y if b_in is None else res.y + b_in), axis=0)  # colsum(G p)
        if target == "pre":
            return cp
        cz = cp if st.fp.scale is None else cp * st.fp.scale  # colsum(G T_pre(p))
        if tpG is not None:
            cz = cz + _colsum_rank(tpG, st.fp.Rt)
        return cz + jnp.sum(Bs * hG, axis=0)
    q = jnp.sum(G * res.dot.reshape(G.shape), axis=0)  # colsum(G T_post(z)); out = dot + b'
    if beff is not None and st.post.conditions_bias:
        q = q + jnp.sum(G, axis=0) * beff
    if tqG is not None:
        q = q - _colsum_rank(tqG, st.fq.Rt)
    if target == "post":
        rec = q / st.fq.scale
    else:  # q = colsum(G z); z = T_pre(p) + h Bs
        q = q - jnp.sum(Bs * hG, axis=0)
        if tpG is not None:
            q = q - _colsum_rank(tpG, st.fp.Rt)
        rec = q / st.fp.scale
    exact = jnp.sum(jnp.take(G, res.idx, axis=1) * res.t_idx, axis=0)
    rec = rec.at[res.idx].set(exact)

    def frozen_exact() -> Array:  # colsum(G t) from t itself: one more frozen matmul
        t = x @ res.W
        if b_in is not None:
            t = t + b_in
        if target == "post":
            t = st.pre.apply(t, st.pp, st.fp) + res.h @ Bs
        return jnp.sum(G * t, axis=0)

    # a runtime branch: only the steps with more ill-conditioned features than exact columns take it
    full = jax.lax.cond(jnp.all(res.covered), lambda: jnp.zeros_like(rec), frozen_exact)
    return jnp.where(res.covered, rec, full)


def _layer_bwd(method: Method, fused: bool, pre: Callable | None, res: Saved, G: Array):
    W, b, lv, h = res.W, res.b, res.lv, res.h
    x = _flat(res.x, W.dtype)
    xd = None if res.xd is None else _flat(res.xd, W.dtype)
    G = G.reshape(-1, G.shape[-1])
    if pre is not None:  # the input again, from what was kept (a pre-activation, gated factors, a norm's input)
        x, pre_vjp = jax.vjp(functools.partial(_input, pre), jax.tree.map(lambda v: after(v, G), x))
    A, Bs = lv["A"], lv["Bs"]
    st = _stages(method, lv)
    pp, pq = st.pp, st.pq
    fp, vjp_pre = jax.vjp(st.pre.factors, pp)
    fq, vjp_post = jax.vjp(st.post.factors, pq)
    b_in, _ = _biases(st, b)
    bypass = _bypass(method, xd)
    xp = xd if bypass else x  # the input of the frozen product entering p
    Weff, beff = None, None
    if fused:  # W' formed again from params tied to G (not the forward's W', kept alive until here)
        Weff, beff = _weight(method, W, b, {k: after(v, G) for k, v in lv.items()})
    r = Bs.shape[0]
    k_p = 0 if fp.L is None else fp.L.shape[1]
    k_q = 0 if fq.L is None else fq.L.shape[1]
    # one pass over G: dh = dz Bs^T = G (Bs T_post)^T; g_p = dz Rt_pre^T; g_q = G Rt_post^T
    cols = _rows(fq, Bs if fp.L is None else jnp.concatenate([Bs, fp.Rt], axis=0)).T
    if fq.L is not None:
        cols = jnp.concatenate([cols, fq.Rt.T], axis=1)
    dh, g_p, g_q = _split(G @ cols, [r, k_p, k_q])
    # one pass over G: [t_post, t_pre, h]^T G
    kept = [t for t in (res.t_post, res.t_pre, h) if t is not None]
    tqG, tpG, hG = _split(_tdot(jnp.concatenate(kept, axis=1), G), [k_q, k_p, r], axis=0)
    grads = {"Bs": _rows_t(fq, hG)}  # h^T dz
    # the thin products of the frozen input, in one pass over it with A's gradient (dh^T xd)
    g_pq = jnp.concatenate([g_q, g_p], axis=1)
    if xd is None and k_p + k_q:
        both = _tdot(jnp.concatenate([dh, g_pq], axis=1), x)
        dAt, gx = both[:r], both[r:]
    else:
        dAt = _tdot(dh, x if xd is None else xd)
        gx = _tdot(g_pq, xp) if k_p + k_q else None
    grads["A"] = dAt.T
    dfp, dfq = Factors(), Factors()
    gp = None
    if gx is not None:
        gp = gx @ W  # g^T p, p = xp W + b_in
        if b_in is not None:
            gp = gp + jnp.sum(g_pq, axis=0)[:, None] * b_in[None, :]
    if fq.L is not None:  # T_post's input z: g_q^T z = T_pre(g_q^T p) + (h^T g_q)^T Bs
        gqz = _rows(fp, gp[:k_q]) + (hG @ fq.Rt.T).T @ Bs
        dfq = dfq._replace(L=gqz.T, Rt=tqG)
    if fp.L is not None:  # T_pre's input p, cotangent dz = G T_post^T
        dfp = dfp._replace(L=gp[k_q:].T, Rt=_rows_t(fq, tpG))
    target = _target(method)
    if target is not None:
        cs = _frozen_colsum(method, st, res, G, xp, hG, tpG if fp.L is not None else None,
                            tqG if fq.L is not None else None, beff)
        if target == "post":
            dfq = dfq._replace(scale=cs)
        else:  # colsum(dz p), dz = G T_post^T = G scale_q + g_q L_q^T
            cdz = cs if fq.scale is None else cs * fq.scale
            if fq.L is not None:
                cdz = cdz + jnp.sum(fq.L.T * gp[:k_q], axis=0)
            dfp = dfp._replace(scale=cdz)
    grads.update(vjp_pre(dfp)[0])
    grads.update(vjp_post(dfq)[0])
    # the cotangent of the frozen product: dp = dz T_pre^T, dz = G T_post^T (dead code unless needed)
    dz = G if fq.scale is None else G * fq.scale
    if fq.L is not None:
        dz = dz + g_q @ fq.L.T
    dp = dz if fp.scale is None else dz * fp.scale
    if fp.L is not None:
        dp = dp + g_p @ fp.L.T
    dyd = None
    if fused:  # the input gradient through the effective weight: one matmul, as in the frozen layer
        dx, dxd = G @ Weff.T, None
    else:
        dxd = dh @ A.T
        if bypass:  # out = T_post(yd + u) + (y - yd) + b: y's cotangent is G, yd's dp - G
            dx = G @ W.T
            dyd = dp - G
            dxd = dxd + dyd @ W.T
        else:  # dp W^T without forming dp: G (W scale)^T + g_q (L_q^T scale_p) W^T + g_p L_p^T W^T
            s = _scale(fq, fp)
            dx = G @ (W if s is None else W * s).T
            if fq.L is not None:
                dx = dx + g_q @ ((fq.L.T if fp.scale is None else fq.L.T * fp.scale) @ W.T)
            if fp.L is not None:
                dx = dx + g_p @ (fp.L.T @ W.T)
        if xd is None:
            dx, dxd = dx + dxd, None
    # cotangents of the frozen kernel and bias: dead code unless they are differentiated
    dW = jnp.dot(x.T, G) + jnp.dot(xd.T, dyd) if bypass else jnp.dot(x.T, dp)
    if b is None:
        db = None
    elif st.post.conditions_bias:
        db = jnp.sum(dp, axis=0)
    else:  # b' = T_pre(b)
        db = _rows_t(fp, jnp.sum(G, axis=0)[None])[0]
    if pre is not None:
        dx = pre_vjp(dx)[0]
    dx = jax.tree.map(lambda d, v: d.reshape(v.shape).astype(v.dtype), dx, res.x)
    dxd = None if dxd is None else dxd.reshape(res.xd.shape).astype(res.xd.dtype)
    return dx, dW, db, dxd, {k: grads[k].astype(v.dtype) for k, v in lv.items()}


_layer.defvjp(_layer_fwd, _layer_bwd)


# -- one adapted layer ---------------------------------------------------------------------------------
def input_norm(kernel: Array, leaves: dict[str, Array], config, scaling: float) -> Array:
    """``n = colnorm(T_pre(W) + s A B): (d_out,)``, the column norm of ``T_post``'s input weight that a map
    with ``reads_norm`` (DoRA's) divides by: from the factors (:func:`dora_norm`) when ``T_pre`` is the
    identity, formed in float32 otherwise. ``kernel: (d_in, d_out)``."""
    method = methods.get(config)
    if not (method.pre.low_rank or method.pre.scaled):
        return dora_norm(kernel, leaves["A"], leaves["B"], scaling)
    lv = {k: v.astype(jnp.float32) for k, v in leaves.items()}
    pp = method.pre.params(lv, config, lambda: colnorm(kernel.astype(jnp.float32)))
    Z = method.pre.apply(kernel.astype(jnp.float32), pp)
    return colnorm(Z + scaling * lv["A"] @ lv["B"])


def layer_leaves(
    kernel: Array, leaves: dict[str, Array], config, scaling: float, dtype, norm: Array | None = None
) -> dict[str, Array]:
    """The leaves in the form the layer uses: ``A``, ``Bs = s B`` and the maps' params (``d``; DoRA's
    ``k = m / n`` with ``n = input_norm(...)``, a constant, or ``norm`` when given; ``C, D`` and
    ``sp = s_p(C, D)``); in ``dtype``."""
    method = methods.get(config)
    lv = {k: v.astype(dtype) for k, v in leaves.items()}
    tail = {"A": lv["A"], "Bs": scaling * lv["B"]}
    tail.update(method.pre.params(lv, config, lambda: colnorm(kernel.astype(dtype))))
    tail.update(method.post.params(
        lv, config, (lambda: input_norm(kernel, leaves, config, scaling)) if norm is None else (lambda: norm)))
    return tail


def input_norms(params: Any, adapter: Adapter) -> dict[str, Array]:
    """``{path: n}`` (``n: (*stacked, d_out)``, :func:`input_norm`) for every adapted module of a method
    whose ``T_post`` reads it (DoRA); ``{}`` for the others.

    ``n`` depends only on the frozen weights and the adapter, yet an adapted layer computes it on every call
    (``O(r d_in d_out)``, more than the layer's own matmul for a few tokens). A loop of forward passes with
    the same adapter (decoding) computes it once here and hands it to :func:`adapted_dense` (``norms=``)."""
    if not methods.get(adapter.config).post.reads_norm:
        return {}
    out = {}
    for path, mod in check_compatible(params, adapter).items():
        W = mod.layout.to_matrix(jnp.asarray(mod.kernel))
        s = adapter.config.scaling_for(path)
        fn = vmap_lead(lambda W_, lv, s=s: input_norm(W_, lv, adapter.config, s), W.ndim - 2)
        out[path] = fn(W, adapter.layers[path])
    return out


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
    norm: Array | None = None,
    gate: Array | None = None,
    input_norm: InputNorm | None = None,
) -> Array:
    """One adapted dense layer on activations. ``x: (..., d_in)``, ``kernel: (d_in, d_out)`` -> ``(..., d_out)``.

    ``fused``: form ``W'`` once per step (see the module docstring); ``False`` keeps every adapter term on
    activations; ``None`` chooses by shape (:func:`fuse_pays`). Both compute the same function.
    ``input_act``: the layer's input is ``act(x)`` for that activation (``sora_jax.models.ACTIVATIONS``);
    the backward keeps ``x`` (which the model keeps anyway for the activation's derivative) and recomputes
    ``act(x)``, instead of keeping a second tensor (``(N, 4 hidden)`` in a transformer's FFN). With ``gate``
    (``x``'s shape; needs ``input_act``) the input is a gated MLP's ``act(gate) * x``, and the backward keeps
    ``x`` and ``gate`` (as the product's own backward does, :func:`sora_jax.activations.gated`). With
    ``input_norm = (fn, scale)`` (instead of the two) the input is a pre-norm block's ``fn(x, scale)``, and
    the backward keeps ``x``, the norm's input, which the norm's own backward keeps, and normalises again.

    Precision: the layer computes in the wider of the activations' and the adapter leaves' dtypes (bfloat16
    activations with a float32 adapter: float32, so that a small rotation or a diagonal near 1 is not lost
    to bfloat16 rounding) and returns the activations' dtype, as PEFT does."""
    out_dt = x.dtype
    dt = functools.reduce(jnp.promote_types, [v.dtype for v in leaves.values()], out_dt)
    W = kernel.astype(dt)
    b = None if bias is None else bias.astype(dt)
    method = methods.get(config)
    dropped = dropout_key is not None and config.lora_dropout > 0.0
    pre, args = input_parts(x, input_act, gate, input_norm)
    if dropped and pre is not None:  # the dropout needs the input: formed here
        x = layer_input(x, input_act, gate, input_norm)
        pre, args = None, (x,)
    tail = layer_leaves(kernel, leaves, config, scaling, dt, norm)
    xd = dropout(x, config.lora_dropout, dropout_key) if dropped else None
    if fused is None:
        fused = fuse_pays(math.prod(x.shape[:-1]), *W.shape)
    # forming W' is exact only in float32 (in bfloat16 a small update would round away)
    fused = fused and xd is None and dt == jnp.float32 and fusable(method)
    xin = args[0] if len(args) == 1 else args  # what the backward keeps: x, or the input's arguments
    return _layer(method, fused, pre, xin, W, b, xd, tail).astype(out_dt)


def fuse_pays(rows: int, d_in: int, d_out: int) -> bool:
    """Whether forming ``W'`` beats the all-activation form for ``rows`` tokens (a static, per-layer choice).

    Beyond the frozen layer, the fused form costs ``4 d_in d_out r`` (``W' = W + s A B`` formed in the
    forward and again in the backward) plus ``4 N r (d_in + d_out)`` in thin products; the unfused form
    ``6 N r (d_in + d_out)``. So fusing pays when ``N > 2 d_in d_out / (d_in + d_out)``: from 614 tokens for a
    384 x 1536 layer, 3277 for 2048 x 8192 (experiments/PERF.md, change 11)."""
    return rows * (d_in + d_out) > 2 * d_in * d_out


def adapted_dense(
    adapter: Adapter,
    dropout_rng: Array | None = None,
    fused: bool | None = None,
    norms: dict[str, Array] | None = None,
) -> Callable[..., Array]:
    """A model ``dense_fn(path, x, kernel, bias)`` that runs ``adapter`` on activations.

    Modules without adapter leaves compute ``x W + b``. The model may pass ``input_act`` (the name of the
    activation to apply to ``x`` first), ``gate`` (the input is then ``act(gate) * x``) or ``input_norm`` (the
    input is ``norm(x, scale)``; see :func:`adapted_layer`). ``dropout_rng``: a key for LoRA dropout
    (``config.lora_dropout``), folded with each module's path (``sora_jax.adapter.module_key``); ``None`` disables
    dropout (evaluation).
    ``fused``: see :func:`adapted_layer` (``None``, the default, chooses per layer by shape; both forms compute
    the same function). ``norms``: :func:`input_norms` of the adapter and the model's parameters, computed
    once for many calls (decoding); only for an adapter that is not being trained (the norms are constants).
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
        gate: Array | None = None,
        input_norm: InputNorm | None = None,
    ) -> Array:
        key = "/".join(path)
        leaves = adapter.layers.get(key)
        if leaves is None:
            return default_dense(path, x, kernel, bias, input_act, gate, input_norm)
        norm = None if norms is None else norms.get(key)
        if layer is not None:
            leaves = {k: v[layer] for k, v in leaves.items()}
            norm = None if norm is None else norm[layer]
        if kernel.ndim != 2:
            raise ValueError(f"activation path needs a 2-D kernel at {key!r}, got {kernel.shape}")
        k = None if dropout_rng is None else module_key(dropout_rng, key)  # as the unrolled layer's when scanned
        if k is not None and layer is not None:
            k = jax.random.fold_in(k, layer)
        return adapted_layer(
            x, kernel, bias, leaves, config, config.scaling_for(key), k, fused, input_act, norm, gate, input_norm
        )

    return dense_fn
