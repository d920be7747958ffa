"""The adapter core against docs/spec.md section 2, checked with an independent float64 NumPy implementation.

Tolerances: the library computes in float32; against float64 references with O(1) values we allow
1e-5 relative + 1e-5 absolute (a few float32 ulps after a handful of matmuls of size <= 16).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import sora_jax as sj
from sora_jax.config import AdapterError
from sora_jax.dense import KAPPA, adapted_dense, dora_norm, fuse_pays, input_norms, layer_leaves, recovery_kappa

METHODS = sj.METHODS
# every method with the paper's rotation, and the exact rotations for the methods that rotate
METHOD_ROTATIONS = [(m, "taylor") for m in METHODS] + [
    (m, r) for m in ("sora", "pre_ortho", "post_ortho") for r in ("cayley", "exp")
]
RTOL = ATOL = 1e-5


# -- fixtures ------------------------------------------------------------------------------------
def make_params(seed: int = 0, dtype=jnp.float32) -> dict:
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    return {
        "enc": {
            "layer_0": {
                "attn": {
                    "query": {"kernel": arr(12, 10), "bias": arr(10)},
                    "nobias": {"kernel": arr(12, 8)},
                },
                "ln": {"scale": arr(12), "bias": arr(12)},
            }
        },
        "stacked": {"kernel": arr(3, 12, 10), "bias": arr(3, 10)},
    }


TARGETS = ["query", "nobias", "stacked"]


def randomize(adapter: sj.Adapter, seed: int = 1) -> sj.Adapter:
    """Trained-looking adapter: every leaf random and non-zero, C != D, m, d and v away from 1."""
    rng = np.random.default_rng(seed)
    layers = {}
    for path, lv in adapter.layers.items():
        new = {}
        for name, v in lv.items():
            x = rng.normal(size=v.shape)
            new[name] = jnp.asarray(1.0 + 0.2 * x if name in ("m", "d", "v") else 0.5 * x, v.dtype)
        layers[path] = new
    return sj.Adapter(adapter.config, layers)


def config(method: str, **kw) -> sj.AdapterConfig:
    kw.setdefault("r", 3)
    kw.setdefault("lora_alpha", 6)
    kw.setdefault("rotation_rank", 2)
    return sj.AdapterConfig(method=method, target_modules=TARGETS, **kw)


# -- float64 NumPy reference of docs/spec.md section 2 --------------------------------------------------
def np_rotation(C, D, initial_s_p, kind):
    sp = min(1.0, initial_s_p / (np.linalg.norm(C) + np.linalg.norm(D) + 1e-6))
    K = sp * (C @ D.T - D @ C.T)
    eye = np.eye(K.shape[0])
    if kind == "taylor":
        return eye + K
    if kind == "exp":
        return scipy.linalg.expm(K)
    return np.linalg.solve(eye - K / 2, eye + K / 2)


def np_effective(W, b, lv, method, s, initial_s_p=1.0, kind="taylor"):
    lv = {k: np.asarray(v, np.float64) for k, v in lv.items()}
    W = np.asarray(W, np.float64)
    b = None if b is None else np.asarray(b, np.float64)
    AB = s * lv["A"] @ lv["B"]
    R = np_rotation(lv["C"], lv["D"], initial_s_p, kind) if "C" in lv else None
    if method == "lora":
        return W + AB, b
    if method == "dora":
        V = W + AB
        return V * (lv["m"] / np.linalg.norm(V, axis=0)), b
    if method == "prediag":
        return W * lv["d"] + AB, None if b is None else lv["d"] * b
    if method == "pre_ortho":
        return W @ R + AB, None if b is None else b @ R
    if method == "post_ortho":
        return (W + AB) @ R, None if b is None else b @ R
    if method == "sora":
        return (W * lv["d"] + AB) @ R, None if b is None else (lv["d"] * b) @ R
    if method == "post_diag":
        return (W + AB) * lv["v"], None if b is None else lv["v"] * b
    raise AssertionError(method)


def module(params, path):
    node = params
    for k in path.split("/"):
        node = node[k]
    return node


# -- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method):
    params = make_params()
    adapter = sj.init_adapter(jax.random.key(0), params, config(method))
    out = sj.apply_adapter(params, adapter)
    for (p, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(out), strict=True
    ):
        if method == "dora":
            # m = colnorm(W) and n = colnorm(W): m / n is 1 up to float32 rounding of the two norms.
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6, err_msg=str(p))
        else:
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=str(p))
    # initial values follow docs/spec.md: B = 0, A bounded by 1/sqrt(d_in), D == C, d == v == 1, m = colnorm(W)
    lv = adapter.layers["enc/layer_0/attn/query"]
    assert not np.any(np.asarray(lv["B"]))
    assert np.abs(np.asarray(lv["A"])).max() <= 1 / np.sqrt(12) and np.abs(np.asarray(lv["A"])).max() > 0
    if "C" in lv:
        np.testing.assert_array_equal(lv["C"], lv["D"])
        assert np.abs(np.asarray(lv["C"])).max() <= 1 / np.sqrt(10)
    if "d" in lv:
        np.testing.assert_array_equal(lv["d"], np.ones(10))
    if "v" in lv:
        np.testing.assert_array_equal(lv["v"], np.ones(10))
    if "m" in lv:
        W = np.asarray(params["enc"]["layer_0"]["attn"]["query"]["kernel"], np.float64)
        np.testing.assert_allclose(lv["m"], np.linalg.norm(W, axis=0), rtol=1e-6)


@pytest.mark.parametrize(("method", "rotation"), METHOD_ROTATIONS)
def test_apply_matches_numpy_reference(method, rotation):
    params = make_params()
    cfg = config(method, rotation=rotation, initial_s_p=0.7)
    adapter = randomize(sj.init_adapter(jax.random.key(0), params, cfg))
    out = sj.apply_adapter(params, adapter)
    s = cfg.scaling_for("x")
    assert s == 2.0
    for path in ("enc/layer_0/attn/query", "enc/layer_0/attn/nobias", "stacked"):
        mod, new, lv = module(params, path), module(out, path), adapter.layers[path]
        W, b = np.asarray(mod["kernel"]), mod.get("bias")
        if W.ndim == 2:
            Wr, br = np_effective(W, b, lv, method, s, 0.7, rotation)
        else:
            res = [
                np_effective(W[i], None if b is None else b[i], {k: v[i] for k, v in lv.items()}, method, s, 0.7, rotation)
                for i in range(W.shape[0])
            ]
            Wr = np.stack([r[0] for r in res])
            br = None if b is None else np.stack([r[1] for r in res])
        np.testing.assert_allclose(np.asarray(new["kernel"]), Wr, rtol=RTOL, atol=ATOL, err_msg=path)
        if br is not None:
            np.testing.assert_allclose(np.asarray(new["bias"]), br, rtol=RTOL, atol=ATOL, err_msg=path)
    # untargeted leaves are passed through as the very same objects
    assert out["enc"]["layer_0"]["ln"]["scale"] is params["enc"]["layer_0"]["ln"]["scale"]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(("method", "rotation"), METHOD_ROTATIONS)
def test_activation_path_equals_weight_path(method, rotation, fused):
    # fused: x W' + b' with W' formed; unfused: every adapter term on activations
    params = make_params()
    cfg = sj.AdapterConfig(method=method, r=3, lora_alpha=6, rotation_rank=2, rotation=rotation,
                           target_modules=["query", "nobias"])
    adapter = randomize(sj.init_adapter(jax.random.key(0), params, cfg))
    eff = sj.apply_adapter(params, adapter)
    dense = adapted_dense(adapter, fused=fused)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 12)), jnp.float32)
    for path in ("enc/layer_0/attn/query", "enc/layer_0/attn/nobias"):
        mod, new = module(params, path), module(eff, path)
        got = dense(tuple(path.split("/")), x, mod["kernel"], mod.get("bias"))
        want = x @ new["kernel"] + new.get("bias", 0.0)
        assert got.shape == (2, 5, new["kernel"].shape[1])
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=path)
    # a module without adapter leaves is a plain dense layer
    W = params["stacked"]["kernel"][0]
    np.testing.assert_allclose(np.asarray(dense(("other",), x, W, None)), np.asarray(x @ W), rtol=1e-6, atol=1e-6)


def test_dora_norm_from_factors_matches_direct():
    rng = np.random.default_rng(0)
    W, A, B = rng.normal(size=(12, 10)), rng.normal(size=(12, 3)), rng.normal(size=(3, 10))
    want = np.linalg.norm(W + 1.5 * A @ B, axis=0)
    got = dora_norm(jnp.asarray(W, jnp.float32), jnp.asarray(A, jnp.float32), jnp.asarray(B, jnp.float32), 1.5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_input_norms_once_equal_the_per_call_norms(method):
    """``input_norms``: DoRA's ``n = colnorm(W + s A B)`` per module (a stacked kernel: one per layer) equals
    float64 NumPy; handed to ``adapted_dense`` it gives the per-call layer's output and is the norm the
    layer uses (twice the norm halves DoRA's magnitude scale). Other methods have no norm to compute."""
    params = make_params()
    adapter = randomize(sj.init_adapter(jax.random.key(0), params, config(method)))
    norms = input_norms(params, adapter)
    if method != "dora":
        assert norms == {}
        return
    assert set(norms) == set(adapter.layers)
    for path, n in norms.items():
        lv = {k: np.asarray(v, np.float64) for k, v in adapter.layers[path].items()}
        W = np.asarray(module(params, path)["kernel"], np.float64)
        want = np.linalg.norm(W + adapter.config.scaling_for(path) * lv["A"] @ lv["B"], axis=-2)
        np.testing.assert_allclose(np.asarray(n), want, rtol=1e-5, err_msg=path)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 12)), jnp.float32)
    mod = module(params, "enc/layer_0/attn/nobias")
    path = ("enc", "layer_0", "attn", "nobias")
    per_call = adapted_dense(adapter, fused=False)(path, x, mod["kernel"], None)
    once = adapted_dense(adapter, fused=False, norms=norms)(path, x, mod["kernel"], None)
    np.testing.assert_allclose(np.asarray(once), np.asarray(per_call), rtol=1e-6, atol=1e-6)
    doubled = {k: 2 * v for k, v in norms.items()}
    half = adapted_dense(adapter, fused=False, norms=doubled)(path, x, mod["kernel"], None)
    np.testing.assert_allclose(np.asarray(half), np.asarray(per_call) / 2, rtol=1e-5, atol=1e-6)
    # a scanned block's slice of a stacked module takes its layer's norm
    W1, b1 = params["stacked"]["kernel"][1], params["stacked"]["bias"][1]
    scanned = adapted_dense(adapter, fused=False, norms=norms)(("stacked",), x, W1, b1, layer=jnp.int32(1))
    eff = sj.apply_adapter(params, adapter)["stacked"]
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(x @ eff["kernel"][1] + eff["bias"][1]),
                               rtol=1e-5, atol=1e-5)


def test_lora_dropout_on_adapter_branch_only():
    params = make_params()
    cfg = sj.AdapterConfig(method="lora", r=3, target_modules=["query"], lora_dropout=0.5)
    adapter = randomize(sj.init_adapter(jax.random.key(0), params, cfg))
    mod = params["enc"]["layer_0"]["attn"]["query"]
    path = ("enc", "layer_0", "attn", "query")
    x = jnp.ones((64, 12))
    no_drop = adapted_dense(adapter)(path, x, mod["kernel"], mod["bias"])
    drop = adapted_dense(adapter, jax.random.key(1))(path, x, mod["kernel"], mod["bias"])
    assert not np.allclose(np.asarray(drop), np.asarray(no_drop))
    # the frozen branch is untouched: removing the adapter branch leaves x W + b in both cases
    zero_b = sj.Adapter(cfg, {k: {**v, "B": jnp.zeros_like(v["B"])} for k, v in adapter.layers.items()})
    plain = x @ mod["kernel"] + mod["bias"]
    np.testing.assert_allclose(
        np.asarray(adapted_dense(zero_b, jax.random.key(1))(path, x, mod["kernel"], mod["bias"])),
        np.asarray(plain), rtol=1e-6, atol=1e-6,
    )


@pytest.mark.parametrize("method", METHODS)
def test_jit_grad_through_apply(method):
    params = make_params()
    adapter = randomize(sj.init_adapter(jax.random.key(0), params, config(method)))
    x = jnp.ones((4, 12))

    def loss(ad):
        p = sj.apply_adapter(params, ad)
        y = x @ p["enc"]["layer_0"]["attn"]["query"]["kernel"] + p["enc"]["layer_0"]["attn"]["query"]["bias"]
        z = jnp.einsum("bi,lio->lbo", x, p["stacked"]["kernel"])
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(z))

    g = jax.jit(jax.grad(loss))(adapter)
    assert isinstance(g, sj.Adapter) and g.config == adapter.config
    for path in ("enc/layer_0/attn/query", "stacked"):
        for name, v in g.layers[path].items():
            assert np.all(np.isfinite(v)) and np.abs(np.asarray(v)).max() > 0, (path, name)


def test_merge_float32_cast_back_and_equals_unmerged():
    params = make_params()
    adapter = randomize(sj.init_adapter(jax.random.key(0), params, config("sora")))
    merged = sj.merge(params, adapter)
    eff = sj.apply_adapter(params, adapter)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(eff), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    p16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
    m16 = sj.merge(p16, adapter)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(m16))
    # computed in float32 from the bf16 weights, then rounded once
    want = sj.apply_adapter(jax.tree.map(lambda v: v.astype(jnp.float32), p16), adapter)
    np.testing.assert_array_equal(
        np.asarray(m16["stacked"]["kernel"]), np.asarray(want["stacked"]["kernel"].astype(jnp.bfloat16))
    )


def test_save_load_bit_exact(tmp_path):
    params = make_params()
    cfg = config("sora", rank_pattern={"stacked": 2}, alpha_pattern={"query": 3.0}, rotation="cayley")
    adapter = randomize(sj.init_adapter(jax.random.key(0), params, cfg))
    adapter.layers["stacked"]["A"] = adapter.layers["stacked"]["A"].astype(jnp.bfloat16)
    sj.save_adapter(adapter, tmp_path / "ad")
    back = sj.load_adapter(tmp_path / "ad")
    assert back.config == adapter.config
    assert jax.tree.structure(back) == jax.tree.structure(adapter)
    for a, b in zip(jax.tree.leaves(adapter), jax.tree.leaves(back), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    with pytest.raises(AdapterError, match="not a sora-jax adapter directory"):
        sj.load_adapter(tmp_path)


def test_config_json_round_trip_and_hashable():
    cfg = config("sora", rank_pattern={"q": 4}, alpha_pattern={"v": 2}, modules_to_save=["classifier"])
    back = sj.AdapterConfig.from_json(cfg.to_json())
    assert back == cfg and hash(back) == hash(cfg)
    assert json.loads(cfg.to_json())["target_modules"] == TARGETS
    assert cfg.rank_for("enc/q") == 4 and cfg.rank_for("enc/k") == 3
    assert cfg.scaling_for("enc/v") == pytest.approx(2 / 3)
    assert sj.AdapterConfig(r=16, lora_alpha=16, use_rslora=True).scaling_for("x") == pytest.approx(4.0)
    with pytest.raises(AdapterError, match="unknown AdapterConfig fields"):
        sj.AdapterConfig.from_dict({"method": "lora", "rank": 3})


def test_targeting_rules():
    params = {"a": {"query": {"kernel": jnp.ones((4, 4))}}, "b": {"xquery": {"kernel": jnp.ones((4, 4))}},
              "attention": {"output": {"dense": {"kernel": jnp.ones((4, 4))}}}, "output": {"dense": {"kernel": jnp.ones((4, 4))}}}
    sel = lambda **kw: set(sj.init_adapter(jax.random.key(0), params, sj.AdapterConfig(r=1, **kw)).layers)  # noqa: E731
    assert sel(target_modules=["query"]) == {"a/query"}  # suffix on a path component, not a substring
    assert sel(target_modules=["attention.output.dense"]) == {"attention/output/dense"}  # PEFT dots
    assert sel(target_modules=["output/dense"]) == {"attention/output/dense", "output/dense"}
    assert sel(target_modules=r".*query") == {"a/query", "b/xquery"}  # regex: fullmatch
    assert sel(target_modules=["dense", "query"], exclude_modules=["attention.output.dense"]) == {"a/query", "output/dense"}


def test_module_init_independent_of_other_targets():
    params = make_params()
    a1 = sj.init_adapter(jax.random.key(0), params, sj.AdapterConfig(r=2, target_modules=["query"]))
    a2 = sj.init_adapter(jax.random.key(0), params, sj.AdapterConfig(r=2, target_modules=TARGETS))
    np.testing.assert_array_equal(a1.layers["enc/layer_0/attn/query"]["A"], a2.layers["enc/layer_0/attn/query"]["A"])
    # stacked slices get different initial values
    A = np.asarray(a2.layers["stacked"]["A"])
    assert not np.array_equal(A[0], A[1])


# -- errors --------------------------------------------------------------------------------------
def test_error_pattern_matches_nothing_lists_paths():
    with pytest.raises(AdapterError, match=r"matches no kernel.*enc/layer_0/attn/query"):
        sj.init_adapter(jax.random.key(0), make_params(), sj.AdapterConfig(target_modules=["qkv"]))
    with pytest.raises(AdapterError, match="target_modules is not set"):
        sj.init_adapter(jax.random.key(0), make_params(), sj.AdapterConfig())


def test_error_rank_too_large():
    with pytest.raises(AdapterError, match=r"rank r=9 is larger than min\(d_in, d_out\)=8 .*'enc/layer_0/attn/nobias'"):
        sj.init_adapter(jax.random.key(0), make_params(), sj.AdapterConfig(r=9, target_modules=["nobias"]))


def test_error_rotation_rank_too_large():
    with pytest.raises(AdapterError, match=r"rotation_rank=5 is too large for module 'enc/layer_0/attn/nobias' \(d_out=8\)"):
        sj.init_adapter(jax.random.key(0), make_params(),
                        sj.AdapterConfig(method="sora", r=2, rotation_rank=5, target_modules=["nobias"]))


def test_error_non_matrix_leaf():
    params = {"weird": {"kernel": jnp.ones((5,))}}
    with pytest.raises(AdapterError, match=r"'weird' is selected but its kernel has shape \(5,\), not a matrix"):
        sj.init_adapter(jax.random.key(0), params, sj.AdapterConfig(r=1, target_modules=["weird"]))


def test_error_adapter_does_not_fit_params():
    params = make_params()
    adapter = sj.init_adapter(jax.random.key(0), params, config("lora"))
    other = jax.tree.map(lambda v: v, params)
    other["enc"]["layer_0"]["attn"]["nobias"]["kernel"] = jnp.ones((12, 11))
    with pytest.raises(AdapterError, match=r"'enc/layer_0/attn/nobias': leaf B has shape \(3, 8\), but the kernel"):
        sj.apply_adapter(other, adapter)
    del other["stacked"]
    with pytest.raises(AdapterError, match=r"'stacked': no such module"):
        sj.merge(other, adapter)


def test_error_bad_config_values():
    with pytest.raises(AdapterError, match="unknown method 'vera'"):
        sj.AdapterConfig(method="vera")
    with pytest.raises(AdapterError, match="unknown rotation 'givens'"):
        sj.AdapterConfig(rotation="givens")
    with pytest.raises(AdapterError, match="rank r must be a positive integer"):
        sj.AdapterConfig(r=0)


@pytest.mark.parametrize("regime", ["init", "calibrated", "degenerate", "beyond"])
@pytest.mark.parametrize("method", ["dora", "prediag", "sora"])
def test_fused_gradients_recovered_from_the_output(method, regime, monkeypatch):
    """The fused layer keeps its output, not ``x W``, and recovers ``d``'s (DoRA: ``k``'s) gradient from it
    by a division, except for the ``EXACT_COLUMNS`` worst-conditioned features, computed exactly.
    "init": ``B = 0``, ``C = D`` (norms that are 0 in exact arithmetic); "calibrated": trained-looking
    leaves, every feature well conditioned; "degenerate": a zero diagonal / magnitude entry and a tiny one,
    or a column whose update dwarfs the frozen weight (exact columns); "beyond": more ill-conditioned
    features than exact columns, whose gradients the step then takes from the whole frozen output (exact,
    never NaN: the fused path trains wherever the unfused one does).
    Against float32 autodiff of ``apply_adapter`` under jit: 1e-4 relative, 1e-5 of the largest gradient."""
    exact_columns = 3  # fewer than the test layers' 8 and 10 features
    monkeypatch.setattr(sj.dense, "EXACT_COLUMNS", exact_columns)
    params = make_params()
    cfg = sj.AdapterConfig(method=method, r=3, lora_alpha=6, rotation_rank=2, target_modules=["query", "nobias"])
    adapter = sj.init_adapter(jax.random.key(0), params, cfg)
    if regime != "init":
        adapter = randomize(adapter)
    scale = "m" if method == "dora" else "d"
    layers = {}
    for path, lv in adapter.layers.items():
        lv = dict(lv)
        if regime == "degenerate":
            lv[scale] = lv[scale].at[1].set(0.0)
            if method == "prediag":  # (in SORA the rotation spreads such a column over every feature)
                lv["B"] = lv["B"].at[:, 2].multiply(1e3)
            elif method == "sora":
                lv["d"] = lv["d"].at[2].set(1e-4)
        elif regime == "beyond":  # every feature zeroed: d_out - exact_columns of them uncovered
            lv[scale] = jnp.zeros_like(lv[scale])
        layers[path] = lv
    adapter = sj.Adapter(adapter.config, layers)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 12)), jnp.float32)
    for path in ("enc/layer_0/attn/query", "enc/layer_0/attn/nobias"):
        mod, key = module(params, path), tuple(path.split("/"))
        d_out = mod["kernel"].shape[1]
        proj = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, d_out)), jnp.float32)

        def activation(ad, x, mod=mod, key=key, proj=proj):
            return jnp.sum(adapted_dense(ad, fused=True)(key, x, mod["kernel"], mod.get("bias")) * proj)

        def weight(ad, x, path=path, proj=proj):
            new = module(sj.apply_adapter(params, ad), path)
            return jnp.sum((x @ new["kernel"] + new.get("bias", 0.0)) * proj)

        got = jax.jit(jax.grad(activation, argnums=(0, 1)))(adapter, x)
        want = jax.grad(weight, argnums=(0, 1))(adapter, x)
        for name in adapter.layers[path]:
            g, w = np.asarray(got[0].layers[path][name]), np.asarray(want[0].layers[path][name])
            assert np.isfinite(g).all(), (path, name)
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(), err_msg=f"{path} {name}")
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-4, atol=1e-5)
        # and the conditioning measure agrees with the regime
        tail = layer_leaves(mod["kernel"], adapter.layers[path], cfg, cfg.scaling_for(path), jnp.float32)
        Weff = sj.methods.effective(mod["kernel"], None, adapter.layers[path], cfg, cfg.scaling_for(path))[0]
        bad = int(jnp.sum(~(recovery_kappa(method, {"W": mod["kernel"], **tail}, Weff) <= KAPPA)))  # NaN is bad
        assert bad == {"init": 0, "calibrated": 0, "degenerate": 1 if method == "dora" else 2, "beyond": d_out}[regime]


def test_fuse_pays_follows_the_flop_counts():
    """``adapted_dense(fused=None)`` forms ``W'`` exactly when that costs fewer FLOPs than the all-activation
    form: fused ``4 d_in d_out r + 4 N r (d_in + d_out)`` against unfused ``6 N r (d_in + d_out)`` (the
    counts of the two backward passes, restated here independently of the rule's closed form)."""
    r = 16
    for rows in (1, 16, 256, 512, 614, 615, 2048, 4096, 65536):
        for d_in, d_out in ((384, 384), (384, 1536), (1536, 384), (2048, 8192), (4096, 4096)):
            fused_cost = 4 * d_in * d_out * r + 4 * rows * r * (d_in + d_out)
            unfused_cost = 6 * rows * r * (d_in + d_out)
            assert fuse_pays(rows, d_in, d_out) == (fused_cost < unfused_cost), (rows, d_in, d_out)
    assert fuse_pays(4096, 384, 1536) and not fuse_pays(512, 2048, 8192)  # minilm / a 1B LLaMA at 4 x 128


@pytest.mark.parametrize("form", ["act", "gated", "norm"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("method", METHODS)
def test_input_act_is_the_activation_applied_first(method, fused, form):
    """``dense_fn(..., input_act="gelu")`` on a pre-activation is the adapted layer on ``gelu(pre)`` (the
    backward recomputes the activation instead of keeping it); with ``gate=g`` (a gated MLP's output layer)
    the adapted layer on ``gelu(g) * pre``; with ``input_norm=(RMSNormFn, scale)`` (a pre-norm block's
    projection) the adapted layer on ``rmsnorm(pre) * scale``: outputs and gradients (adapter leaves, the
    pre-activation, the gate, the norm's scale) against autodiff of the weight path, the input formed then
    ``apply_adapter``'s layer, under jit. Tolerance as for the fused gradients: 1e-4 relative, 1e-5 of the
    largest value (float32, other summation orders)."""
    from sora_jax.models.common import ACTIVATIONS
    from sora_jax.models.llama import RMSNormFn

    params = make_params()
    cfg = sj.AdapterConfig(method=method, r=3, lora_alpha=6, rotation_rank=2, target_modules=["query"])
    adapter = randomize(sj.init_adapter(jax.random.key(0), params, cfg))
    path = "enc/layer_0/attn/query"
    mod, key = module(params, path), tuple(path.split("/"))
    pre = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 12)), jnp.float32)
    proj = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 10)), jnp.float32)
    other = {"act": None, "gated": (2, 5, 12), "norm": (12,)}[form]  # the gate, or the norm's scale
    other = None if other is None else jnp.asarray(np.random.default_rng(5).normal(size=other), jnp.float32)
    norm = RMSNormFn(1e-6, jnp.float32)

    def activation(ad, pre, other):
        kw = {"act": {"input_act": "gelu"}, "gated": {"input_act": "gelu", "gate": other},
              "norm": {"input_norm": (norm, other)}}[form]  # fmt: skip
        y = adapted_dense(ad, fused=fused)(key, pre, mod["kernel"], mod["bias"], **kw)
        return jnp.sum(y * proj), y

    def weight(ad, pre, other):
        new = module(sj.apply_adapter(params, ad), path)
        gelu = ACTIVATIONS["gelu"]
        u = {"act": lambda: gelu(pre), "gated": lambda: gelu(other) * pre, "norm": lambda: norm(pre, other)}[form]()
        y = u @ new["kernel"] + new["bias"]
        return jnp.sum(y * proj), y

    (_, got_y), got = jax.jit(jax.value_and_grad(activation, argnums=(0, 1, 2), has_aux=True))(adapter, pre, other)
    (_, want_y), want = jax.value_and_grad(weight, argnums=(0, 1, 2), has_aux=True)(adapter, pre, other)
    np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), rtol=1e-5, atol=1e-5)
    pairs = [(got[0].layers[path][n], want[0].layers[path][n], n) for n in adapter.layers[path]]
    pairs += [(got[1], want[1], "pre")] + ([(got[2], want[2], form)] if other is not None else [])
    for g, w, name in pairs:
        g, w = np.asarray(g), np.asarray(w)
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(), err_msg=name)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("method", ["lora", "sora"])
def test_input_act_keeps_the_pre_activation_only(method, fused):
    """Memory, from XLA's compiled memory analysis of the gradient (deterministic, not a timing): in a
    stack of ``L`` FFN blocks, handing the FFN's second layer the pre-activation (``input_act``) instead of
    ``gelu(pre)`` saves at least ``L - 2`` activations ``(N, f)``: the backward recomputes each one rather
    than keeping it from the forward (with an optimisation barrier instead of a data dependency on the
    cotangent, XLA merges the recomputation into the forward and nothing is saved)."""
    from sora_jax.models.common import ACTIVATIONS

    L, N, d, f = 4, 512, 64, 256
    rng = np.random.default_rng(0)

    def layer(*shape):
        return {"kernel": jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32),
                "bias": jnp.zeros(shape[1], jnp.float32)}

    params = {f"b{i}": {"up": layer(d, f), "down": layer(f, d)} for i in range(L)}
    adapter = sj.init_adapter(jax.random.key(0), params, sj.AdapterConfig(method=method, r=4,
                                                                          target_modules=["up", "down"]))
    x = jnp.asarray(rng.normal(size=(N, d)), jnp.float32)

    def loss(ad, x, recompute):
        dense = adapted_dense(ad, fused=fused)
        h = x
        for i in range(L):
            up, down = params[f"b{i}"]["up"], params[f"b{i}"]["down"]
            pre = dense((f"b{i}", "up"), h, up["kernel"], up["bias"])
            if recompute:
                y = dense((f"b{i}", "down"), pre, down["kernel"], down["bias"], input_act="gelu")
            else:
                y = dense((f"b{i}", "down"), ACTIVATIONS["gelu"](pre), down["kernel"], down["bias"])
            h = jnp.tanh(h + y)
        return jnp.sum(h)

    temp = {rc: jax.jit(jax.grad(loss), static_argnums=2).lower(adapter, x, rc).compile()
            .memory_analysis().temp_size_in_bytes for rc in (False, True)}
    assert temp[False] - temp[True] >= (L - 2) * N * f * 4, temp


@pytest.mark.parametrize("method", METHODS)
def test_fused_backward_forms_the_effective_weight_again(method):
    """Memory, from XLA's compiled memory analysis of the gradient: a fused layer's backward forms ``W'``
    again rather than keeping the forward's (XLA would merge the two and keep ``W'`` alive from the forward
    to the backward). In a stack of ``(d, d)`` layers, what the gradient keeps per layer is ``a N + c``
    (``N`` tokens): activations, and ``c`` the token-independent rest, which must stay below half of one
    ``W'`` (it is one ``W'`` when the forward's is kept)."""
    d = 256
    rng = np.random.default_rng(0)

    def temp_bytes(L: int, N: int) -> int:
        params = {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=(d, d)) / np.sqrt(d), jnp.float32),
                            "bias": jnp.zeros(d, jnp.float32)} for i in range(L)}
        adapter = sj.init_adapter(jax.random.key(0), params, sj.AdapterConfig(method=method, r=4,
                                                                              target_modules=list(params)))

        def loss(ad, params, x):
            dense = adapted_dense(ad, fused=True)
            for i in range(L):
                x = jnp.tanh(dense((f"l{i}",), x, params[f"l{i}"]["kernel"], params[f"l{i}"]["bias"]))
            return jnp.sum(x)

        x = jnp.asarray(rng.normal(size=(N, d)), jnp.float32)
        return jax.jit(jax.grad(loss)).lower(adapter, params, x).compile().memory_analysis().temp_size_in_bytes

    n1, n2 = 512, 1024
    s1, s2 = ((temp_bytes(6, n) - temp_bytes(2, n)) / 4 for n in (n1, n2))  # kept per layer
    c = (n2 * s1 - n1 * s2) / (n2 - n1)
    assert c < d * d * 4 / 2, c / (d * d * 4)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("regime", ["init", "trained", "zero_entries", "all_zero"])
def test_post_diag_gradients_of_both_paths_agree(regime, fused, monkeypatch):
    """Post-Diag, ``W' = (W + s A B) diag(v)``: the activation path's hand-written backward gives the same
    gradients (every leaf and the input) as autodiff of the weight path (``apply_adapter``), under jit: at
    init, trained-looking, with zero entries of ``v`` (recovered exactly in the fused form, as DoRA's ``m``)
    and with every entry 0 (the whole frozen output computed in that step). Tolerance as for the fused
    gradients above: 1e-4 relative, 1e-5 of the largest gradient (float32, other summation orders)."""
    monkeypatch.setattr(sj.dense, "EXACT_COLUMNS", 3)  # fewer than the layers' 8 and 10 features
    params = make_params()
    cfg = sj.AdapterConfig(method="post_diag", r=3, lora_alpha=6, target_modules=["query", "nobias"])
    adapter = sj.init_adapter(jax.random.key(0), params, cfg)
    if regime != "init":
        adapter = randomize(adapter)
    if regime == "zero_entries":
        adapter = sj.Adapter(cfg, {p: {**lv, "v": lv["v"].at[1].set(0.0).at[4].set(0.0)} for p, lv in adapter.layers.items()})
    if regime == "all_zero":
        adapter = sj.Adapter(cfg, {p: {**lv, "v": jnp.zeros_like(lv["v"])} for p, lv in adapter.layers.items()})
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 12)), jnp.float32)
    for path in ("enc/layer_0/attn/query", "enc/layer_0/attn/nobias"):
        mod, key = module(params, path), tuple(path.split("/"))
        proj = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, mod["kernel"].shape[1])), jnp.float32)

        def activation(ad, x, mod=mod, key=key, proj=proj):
            return jnp.sum(adapted_dense(ad, fused=fused)(key, x, mod["kernel"], mod.get("bias")) * proj)

        def weight(ad, x, path=path, proj=proj):
            new = module(sj.apply_adapter(params, ad), path)
            return jnp.sum((x @ new["kernel"] + new.get("bias", 0.0)) * proj)

        got = jax.jit(jax.grad(activation, argnums=(0, 1)))(adapter, x)
        want = jax.grad(weight, argnums=(0, 1))(adapter, x)
        for name in ("A", "B", "v"):
            g, w = np.asarray(got[0].layers[path][name]), np.asarray(want[0].layers[path][name])
            assert np.isfinite(g).all(), (path, name)
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(np.abs(w).max(), 1e-30), err_msg=f"{path} {name}")
        assert np.abs(np.asarray(want[0].layers[path]["v"])).max() > 0  # v has a gradient to agree on
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-4, atol=1e-5)


def test_post_diag_trains_the_same_through_both_paths():
    """Twenty SGD steps of Post-Diag on a regression target, once through the weight path and once through
    the activation path (fused and unfused), from the same init: the loss falls by more than half on each
    and the three trajectories agree to 1e-4 relative (float32, other summation orders, compounded over the
    steps)."""
    params = make_params()
    cfg = sj.AdapterConfig(method="post_diag", r=3, lora_alpha=6, target_modules=["query"])
    path, key = "enc/layer_0/attn/query", ("enc", "layer_0", "attn", "query")
    mod = module(params, path)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(64, 12)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(12, 10)) * 0.3, jnp.float32)
    y_true = x @ (mod["kernel"] * jnp.linspace(0.5, 1.5, 10) + target) + mod["bias"]

    def weight_out(ad):
        new = module(sj.apply_adapter(params, ad), path)
        return x @ new["kernel"] + new["bias"]

    def activation_out(fused):
        return lambda ad: adapted_dense(ad, fused=fused)(key, x, mod["kernel"], mod["bias"])

    losses = {}
    for name, out in (("weight", weight_out), ("fused", activation_out(True)), ("unfused", activation_out(False))):
        loss = jax.jit(jax.value_and_grad(lambda ad, out=out: jnp.mean((out(ad) - y_true) ** 2)))
        ad = sj.init_adapter(jax.random.key(0), params, cfg)
        curve = []
        for _ in range(20):
            value, g = loss(ad)
            curve.append(float(value))
            ad = jax.tree.map(lambda p, q: p - 0.05 * q, ad, g)
        losses[name] = np.asarray(curve)
    for name, curve in losses.items():
        assert curve[-1] < 0.5 * curve[0], (name, curve)
    np.testing.assert_allclose(losses["fused"], losses["weight"], rtol=1e-4)
    np.testing.assert_allclose(losses["unfused"], losses["weight"], rtol=1e-4)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(("method", "rotation"), [(m, r) for m in ("sora", "pre_ortho", "post_ortho")
                                                  for r in ("cayley", "exp")])
def test_exact_rotations_gradients_of_both_paths_agree(method, rotation, fused):
    """The exact rotations run the same hand-written backward as the paper's (their ``L = U``,
    ``Rt = Phi U^T``, ``Phi`` differentiated by autodiff of the ``2 r_p x 2 r_p`` core): gradients of every
    leaf and the input against autodiff of the weight path, under jit; 1e-4 relative, 1e-5 of the largest
    gradient, as above."""
    params = make_params()
    cfg = sj.AdapterConfig(method=method, r=3, lora_alpha=6, rotation_rank=2, rotation=rotation,
                           target_modules=["query"])
    adapter = randomize(sj.init_adapter(jax.random.key(0), params, cfg))
    path = "enc/layer_0/attn/query"
    mod, key = module(params, path), tuple(path.split("/"))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 12)), jnp.float32)
    proj = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 10)), jnp.float32)

    def activation(ad, x):
        return jnp.sum(adapted_dense(ad, fused=fused)(key, x, mod["kernel"], mod["bias"]) * proj)

    def weight(ad, x):
        new = module(sj.apply_adapter(params, ad), path)
        return jnp.sum((x @ new["kernel"] + new["bias"]) * proj)

    got = jax.jit(jax.grad(activation, argnums=(0, 1)))(adapter, x)
    want = jax.grad(weight, argnums=(0, 1))(adapter, x)
    for name in adapter.layers[path]:
        g, w = np.asarray(got[0].layers[path][name]), np.asarray(want[0].layers[path][name])
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(), err_msg=name)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-4, atol=1e-5)
