"""Multi-dimensional kernels (``DenseGeneral``/einsum) are one matrix over their feature axes; stacked axes
are told apart from feature axes by the bias or a declaration, never a guess (sora_jax/layout.py).

The reference is docs/spec.md section 2 applied by hand, in float64 NumPy (``np_effective`` of
test_adapter_core), to the kernel reshaped to ``(d_in, d_out)`` and reshaped back; the attention module
is then run with those parameters. Tolerance: the library computes in float32, the reference in float64,
with O(1) values through a few matmuls of size <= 32: 1e-5 relative + 1e-5 absolute on weights, 2e-5 on
the attention outputs (two more float32 matmuls and a softmax).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_adapter_core import np_effective, randomize

import sora_jax as sj
from sora_jax.config import AdapterError
from sora_jax.layout import Layout

METHODS = sj.METHODS
D_IN, HEADS, HEAD_DIM = 8, 4, 3  # (d_in, heads, head_dim): d_in != heads so that the bias tells axes apart
PROJ = ["query", "key", "value", "out"]
ROLES = {"query": "ioo", "key": "ioo", "value": "ioo", "out": "iio"}


def _reference(params: dict, adapter: sj.Adapter, stacked: int = 0) -> dict:
    """docs/spec.md section 2 on the reshaped matrix, float64, for every adapted projection of ``params``
    (``{name: {"kernel", "bias"?}}``; ``stacked`` leading axes handled by a Python loop)."""
    cfg = adapter.config
    out = {}
    for name, mod in params.items():
        path = next(p for p in adapter.layers if p.split("/")[-1] == name)
        K = np.asarray(mod["kernel"], np.float64)
        b = None if "bias" not in mod else np.asarray(mod["bias"], np.float64)
        lead = K.shape[:stacked]
        feat = K.shape[stacked:]
        d_in = feat[0] if name != "out" else feat[0] * feat[1]
        Ks, Bs = [], []
        for idx in np.ndindex(*lead):
            W = K[idx].reshape(d_in, -1)
            bb = None if b is None else b[idx].reshape(-1)
            lv = {k: np.asarray(v)[idx] for k, v in adapter.layers[path].items()}
            W2, b2 = np_effective(W, bb, lv, cfg.method, cfg.scaling_for(path), cfg.initial_s_p, cfg.rotation)
            Ks.append(W2.reshape(feat))
            Bs.append(None if b2 is None else b2.reshape(b[idx].shape))
        out[name] = {"kernel": np.stack(Ks).reshape(K.shape)}
        if b is not None:
            out[name]["bias"] = np.stack(Bs).reshape(b.shape)
    return out


def _cfg(method: str, **kw) -> sj.AdapterConfig:
    kw.setdefault("r", 3)
    return sj.AdapterConfig(method=method, lora_alpha=6, rotation_rank=2, target_modules=PROJ, **kw)


def _x(shape=(2, 5, D_IN), seed=3):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# -- Layout itself -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("roles", "shape", "matrix", "bias"),
    [
        ("io", (5, 7), (5, 7), (7,)),
        ("oi", (7, 5), (5, 7), (7,)),
        ("ioo", (8, 4, 3), (8, 12), (4, 3)),
        ("iio", (4, 3, 8), (12, 8), (8,)),
        ("sioo", (2, 8, 4, 3), (2, 8, 12), (2, 4, 3)),
        ("soi", (2, 7, 5), (2, 5, 7), (2, 7)),
        ("ois", (7, 5, 2), (2, 5, 7), (7, 2)),
    ],
)
def test_layout_round_trips_and_matches_a_numpy_reshape(roles, shape, matrix, bias):
    rng = np.random.default_rng(0)
    lay = Layout(roles, shape)
    assert lay.matrix_shape == matrix and lay.bias_shape == bias
    W = rng.normal(size=shape)
    M = np.asarray(lay.to_matrix(jnp.asarray(W, jnp.float32)))
    # independent reference: move axes with NumPy, s first, then i, then o
    order = [k for c in "sio" for k, r in enumerate(roles) if r == c]
    np.testing.assert_array_equal(M, np.transpose(W, order).reshape(matrix).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(lay.from_matrix(jnp.asarray(M))), W.astype(np.float32))
    b = rng.normal(size=bias).astype(np.float32)
    v = np.asarray(lay.bias_to_vector(jnp.asarray(b)))
    kept = [r for r in roles if r != "i"]
    border = [k for c in "so" for k, r in enumerate(kept) if r == c]
    np.testing.assert_array_equal(v, np.transpose(b, border).reshape((*matrix[:-2], matrix[-1])))
    np.testing.assert_array_equal(np.asarray(lay.bias_from_vector(jnp.asarray(v))), b)


# -- linen MultiHeadDotProductAttention --------------------------------------------------------
def _linen_mha(use_bias: bool) -> tuple[nn.Module, dict]:
    mha = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=HEADS * HEAD_DIM, out_features=D_IN,
                                          use_bias=use_bias)
    params = mha.init(jax.random.key(0), _x())["params"]
    return mha, params


@pytest.mark.parametrize("method", METHODS)
def test_linen_attention_equals_method_on_reshaped_matrix(method):
    mha, params = _linen_mha(use_bias=True)
    assert params["query"]["kernel"].shape == (D_IN, HEADS, HEAD_DIM)
    assert params["out"]["kernel"].shape == (HEADS, HEAD_DIM, D_IN)
    # r = 8 > heads and > head_dim: only legal when the kernel is read as one (8, 12) / (12, 8) matrix
    adapter = randomize(sj.init_adapter(jax.random.key(0), params, _cfg(method, r=8)))
    assert adapter.layers["query"]["A"].shape == (D_IN, 8)
    assert adapter.layers["query"]["B"].shape == (8, HEADS * HEAD_DIM)
    assert adapter.layers["out"]["A"].shape == (HEADS * HEAD_DIM, 8)
    eff = sj.apply_adapter(params, adapter)
    ref = _reference(params, adapter)
    for name in PROJ:
        for leaf in ("kernel", "bias"):
            assert eff[name][leaf].shape == params[name][leaf].shape
            np.testing.assert_allclose(np.asarray(eff[name][leaf]), ref[name][leaf], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{name}/{leaf}")
    x = _x()
    got = mha.apply({"params": eff}, x)
    want = mha.apply({"params": jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), ref)}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert not np.allclose(np.asarray(got), np.asarray(mha.apply({"params": params}, x)), atol=1e-3)


def test_linen_attention_without_bias_needs_a_declaration():
    mha, params = _linen_mha(use_bias=False)
    with pytest.raises(AdapterError) as e:
        sj.init_adapter(jax.random.key(0), params, _cfg("sora"))
    msg = str(e.value)
    # names the path, the shape, the readings and the fix
    assert "'key$'" in msg and "(8, 4, 3)" in msg and "kernel_axes" in msg and "'ioo'" in msg and "'sio'" in msg
    adapter = randomize(sj.init_adapter(jax.random.key(0), params, _cfg("sora", kernel_axes=ROLES)))
    eff = sj.apply_adapter(params, adapter)
    ref = _reference(params, adapter)
    x = _x()
    np.testing.assert_allclose(
        np.asarray(mha.apply({"params": eff}, x)),
        np.asarray(mha.apply({"params": jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), ref)}, x)),
        rtol=2e-5, atol=2e-5,
    )
    # a declaration that contradicts the shape is an error naming the module and the roles
    with pytest.raises(AdapterError, match=r"'out'.*roles 'io' for a weight of shape \(4, 3, 8\)"):
        sj.init_adapter(jax.random.key(0), params, _cfg("lora", kernel_axes={"out": "io", ".*": "ioo"}))


class _Block(nn.Module):
    use_bias: bool

    @nn.compact
    def __call__(self, x, _):
        y = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=HEADS * HEAD_DIM, out_features=D_IN,
                                            use_bias=self.use_bias, name="attn")(x)
        return x + y, None


def _scanned(use_bias: bool, layers: int = 2):
    stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=layers)(use_bias)
    params = stack.init(jax.random.key(0), _x(), None)["params"]
    return stack, params


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
def test_scanned_attention_stacked_axis_from_bias_or_declaration(use_bias):
    stack, params = _scanned(use_bias)
    assert params["attn"]["query"]["kernel"].shape == (2, D_IN, HEADS, HEAD_DIM)
    kw = {} if use_bias else {"kernel_axes": {k: "s" + v for k, v in ROLES.items()}}
    if not use_bias:
        with pytest.raises(AdapterError, match=r"'attn/key': the kernel of shape \(2, 8, 4, 3\) can be read as"):
            sj.init_adapter(jax.random.key(0), params, _cfg("dora"))
    adapter = randomize(sj.init_adapter(jax.random.key(0), params, _cfg("sora", **kw)))
    assert adapter.layers["attn/query"]["A"].shape == (2, D_IN, 3)
    assert adapter.layers["attn/out"]["C"].shape == (2, D_IN, 2)
    eff = sj.apply_adapter(params, adapter)
    ref = _reference(params["attn"], adapter, stacked=1)
    for name in PROJ:
        np.testing.assert_allclose(np.asarray(eff["attn"][name]["kernel"]), ref[name]["kernel"], rtol=1e-5, atol=1e-5)
    x = _x()
    want = stack.apply({"params": {"attn": jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), ref)}}, x, None)[0]
    # two residual attention blocks with random adapters reach |y| ~ 1e2: float32 rounding relative to that scale
    np.testing.assert_allclose(np.asarray(stack.apply({"params": eff}, x, None)[0]), np.asarray(want),
                               rtol=2e-5, atol=2e-5 * float(np.abs(want).max()))


def test_bias_that_fits_several_readings_is_an_error():
    # d_in == heads: a (4, 4, 3) kernel with bias (4, 3) is a DenseGeneral (4 -> 4x3) or 4 stacked (4, 3) layers
    params = {"proj": {"kernel": jnp.ones((4, 4, 3)), "bias": jnp.ones((4, 3))}}
    with pytest.raises(AdapterError, match=r"'proj'.*\(4, 4, 3\).*'ioo': one \(4, 12\).*'sio': 4 stacked \(4, 3\).*kernel_axes"):
        sj.init_adapter(jax.random.key(0), params, sj.AdapterConfig(r=2, target_modules=["proj"]))
    a = sj.init_adapter(jax.random.key(0), params, sj.AdapterConfig(r=2, target_modules=["proj"], kernel_axes={"proj": "ioo"}))
    assert a.layers["proj"]["A"].shape == (4, 2) and a.layers["proj"]["B"].shape == (2, 12)


def test_spectrum_of_a_densegeneral_kernel_is_the_matrix_spectrum():
    _, params = _linen_mha(use_bias=True)
    adapter = randomize(sj.init_adapter(jax.random.key(0), params, _cfg("lora", r=2)))
    spec = sj.spectrum(params, adapter)
    ref = _reference(params, adapter)
    delta = (ref["query"]["kernel"] - np.asarray(params["query"]["kernel"], np.float64)).reshape(D_IN, -1)
    sigma = np.linalg.svd(delta, compute_uv=False)
    assert spec["query"]["stable_rank"] == pytest.approx((sigma**2).sum() / sigma[0] ** 2, rel=1e-4)
    assert sj.trainable_parameters(params, adapter)["trainable"] == 4 * 2 * (D_IN + HEADS * HEAD_DIM)


# -- Flax NNX ----------------------------------------------------------------------------------
def _nnx_mha(use_bias: bool = True) -> nnx.MultiHeadAttention:
    return nnx.MultiHeadAttention(num_heads=HEADS, in_features=D_IN, qkv_features=HEADS * HEAD_DIM,
                                  out_features=D_IN, use_bias=use_bias, decode=False, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("method", METHODS)
def test_nnx_attention_state_in_state_out(method):
    model = _nnx_mha()
    graphdef, state = nnx.split(model)
    adapter = randomize(sj.init_adapter(jax.random.key(0), state, _cfg(method, r=8)))
    assert set(adapter.layers) == set(PROJ)
    eff = sj.apply_adapter(state, adapter)
    # the same structure: an nnx.State with the same tree, Variables in place
    assert isinstance(eff, nnx.State)
    assert jax.tree.structure(eff) == jax.tree.structure(state)
    pure = nnx.to_pure_dict(state)
    ref = _reference({k: pure[k] for k in PROJ}, adapter)
    got_pure = nnx.to_pure_dict(eff)
    for name in PROJ:
        for leaf in ("kernel", "bias"):
            np.testing.assert_allclose(np.asarray(got_pure[name][leaf]), ref[name][leaf], rtol=1e-5, atol=1e-5)
    x = _x()
    got = nnx.merge(graphdef, eff)(x)
    ref_pure = nnx.to_pure_dict(state)
    ref_pure.update({k: jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), ref[k]) for k in PROJ})
    ref_state = jax.tree.map(lambda v: v, state)  # fresh Variables: the reference must not write into `state`
    nnx.replace_by_pure_dict(ref_state, ref_pure)
    np.testing.assert_allclose(np.asarray(got), np.asarray(nnx.merge(graphdef, ref_state)(x)), rtol=2e-5, atol=2e-5)
    # merge, spectrum and trainable_parameters take the state too
    merged = sj.merge(state, adapter)
    assert isinstance(merged, nnx.State)
    np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, merged)(x)), np.asarray(got), rtol=1e-5, atol=1e-5)
    assert set(sj.spectrum(state, adapter)) == set(PROJ)
    n_params = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    counts = sj.trainable_parameters(nnx.state(model, nnx.Param), adapter)
    assert counts["total"] == n_params + counts["trainable"]


def test_nnx_jit_grad_wrt_adapter_and_update():
    model = _nnx_mha()
    graphdef, state = nnx.split(model)
    adapter = randomize(sj.init_adapter(jax.random.key(0), state, _cfg("sora")))
    x = _x()

    def loss(ad, st):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, sj.apply_adapter(st, ad))(x)))

    g = jax.jit(jax.grad(loss))(adapter, state)
    assert isinstance(g, sj.Adapter) and set(g.layers) == set(PROJ)
    # a finite-difference check of one coordinate (float32: step 1e-2, agreement to 2 %)
    eps = 1e-2
    bumped = jax.tree.map(lambda v: v, adapter)
    bumped.layers["value"]["B"] = adapter.layers["value"]["B"].at[0, 0].add(eps)
    lower = jax.tree.map(lambda v: v, adapter)
    lower.layers["value"]["B"] = adapter.layers["value"]["B"].at[0, 0].add(-eps)
    fd = (loss(bumped, state) - loss(lower, state)) / (2 * eps)
    assert float(g.layers["value"]["B"][0, 0]) == pytest.approx(float(fd), rel=2e-2, abs=1e-4)
    # nnx.update writes the adapted weights into the live model (whose Variables `state` shares)
    want = nnx.merge(graphdef, sj.apply_adapter(state, adapter))(x)
    nnx.update(model, sj.merge(state, adapter))
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_nnx_attention_without_bias_names_path_shape_and_fix():
    _, state = nnx.split(_nnx_mha(use_bias=False))
    with pytest.raises(AdapterError, match=r"'key'.*\(8, 4, 3\).*kernel_axes=\{'key\$': ROLES\}"):
        sj.init_adapter(jax.random.key(0), state, _cfg("lora"))
    adapter = sj.init_adapter(jax.random.key(0), state, _cfg("lora", kernel_axes=ROLES))
    assert adapter.layers["out"]["A"].shape == (HEADS * HEAD_DIM, 3)
