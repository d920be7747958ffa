"""``sora_jax.models.attention.dot_product_attention``: values against ``jax.nn.dot_product_attention`` (an
independent implementation), gradients against autodiff of it and of the explicit dropout formula, and
what the backward pass keeps (XLA's compiled memory analysis)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models.attention import dot_product_attention, rotary_attention

B, T, H, D = 3, 9, 2, 8
# float32 against float32 in another summation order; sums over <= 9 keys and 8 features: errors ~1e-6
TOL = dict(rtol=1e-4, atol=1e-5)


def _qkv(seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v, w = (jax.random.normal(kk, (B, T, H, D), jnp.float32) for kk in ks)
    return q, k, v, w


def _bias(kind: str) -> jax.Array | None:
    if kind == "none":
        return None
    if kind == "padding":  # batch 1 has 4 padded keys, batch 2 only padding (rows of uniform probabilities)
        mask = np.ones((B, T), bool)
        mask[1, 5:] = False
        mask[2, :] = False
        return jnp.where(jnp.asarray(mask)[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
    return jax.random.normal(jax.random.key(7), (B, H, T, T), jnp.float32)  # a full, differentiated bias


@pytest.mark.parametrize("kind", ["none", "padding", "full"])
def test_values_and_gradients_match_jax_nn(kind: str):
    q, k, v, w = _qkv()
    bias = _bias(kind)
    argnums = (0, 1, 2, 3) if kind == "full" else (0, 1, 2)

    def loss(attn):
        return lambda q, k, v, b: jnp.sum(w * attn(q, k, v, bias=b))

    ours = jax.value_and_grad(loss(dot_product_attention), argnums)(q, k, v, bias)
    ref = jax.value_and_grad(loss(jax.nn.dot_product_attention), argnums)(q, k, v, bias)
    np.testing.assert_allclose(ours[0], ref[0], **TOL)
    for name, a, b in zip("qkvb"[: len(argnums)], ours[1], ref[1], strict=True):
        assert float(jnp.max(jnp.abs(b))) > 1e-3, name  # a gradient that is there to compare
        np.testing.assert_allclose(a, b, **TOL, err_msg=name)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_heads_and_a_boolean_mask_match_jax_nn(kv_heads: int):
    """Grouped-query attention (4 query heads reading ``kv_heads`` key/value heads) with a causal and
    key-padding boolean mask, plus a per-head bias: values and gradients as autodiff of jax.nn's."""
    ks = jax.random.split(jax.random.key(5), 5)
    q, w = (jax.random.normal(kk, (B, T, 4, D)) for kk in ks[:2])
    k, v = (jax.random.normal(kk, (B, T, kv_heads, D)) for kk in ks[2:4])
    bias = jax.random.normal(ks[4], (1, 4, T, T))
    pad = np.ones((B, T), bool)
    pad[1, 6:] = False
    mask = jnp.tril(jnp.ones((T, T), bool))[None, None] & jnp.asarray(pad)[:, None, None, :]

    def loss(attn):
        return lambda q, k, v, b: jnp.sum(w * attn(q, k, v, bias=b, mask=mask, scale=0.3))

    ours = jax.value_and_grad(loss(dot_product_attention), (0, 1, 2, 3))(q, k, v, bias)
    ref = jax.value_and_grad(loss(jax.nn.dot_product_attention), (0, 1, 2, 3))(q, k, v, bias)
    np.testing.assert_allclose(ours[0], ref[0], **TOL)
    for name, a, b in zip("qkvb", ours[1], ref[1], strict=True):
        assert float(jnp.max(jnp.abs(b))) > 1e-3, name
        np.testing.assert_allclose(a, b, **TOL, err_msg=name)


def test_dropout_is_the_explicit_formula_with_the_same_mask():
    q, k, v, w = _qkv(1)
    bias, rate, key = _bias("padding"), 0.25, jax.random.key(3)
    keep = jax.random.bernoulli(key, 1.0 - rate, (B, H, T, T))

    def explicit(q, k, v):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D) + bias
        probs = jnp.where(keep, jax.nn.softmax(logits, axis=-1) / (1.0 - rate), 0.0)
        return jnp.sum(w * jnp.einsum("bhqk,bkhd->bqhd", probs, v))

    def ours(q, k, v):
        return jnp.sum(w * dot_product_attention(q, k, v, bias=bias, dropout_rate=rate, dropout_rng=key))

    got, ref = jax.value_and_grad(ours, (0, 1, 2))(q, k, v), jax.value_and_grad(explicit, (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got[0], ref[0], **TOL)
    for a, b in zip(got[1], ref[1], strict=True):
        np.testing.assert_allclose(a, b, **TOL)
    plain = jnp.sum(w * dot_product_attention(q, k, v, bias=bias))
    assert abs(float(plain - got[0])) > 1e-3  # the mask did drop something
    # no key, or rate 0: no dropout
    np.testing.assert_array_equal(dot_product_attention(q, k, v, bias=bias, dropout_rate=rate),
                                  dot_product_attention(q, k, v, bias=bias, dropout_rng=key))


def _rope_reference(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Hugging Face's ``apply_rotary_pos_emb`` on ``(B, T, heads, D)``: ``x cos + rotate_half(x) sin``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def _head_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    """An RMS norm over each head's features with a ``(1 + scale)`` gain (Gemma 3's QK-norm)."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * (1.0 + scale)


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_attention_is_rotation_then_attention(dropout: bool, qk_norm: bool):
    """``rotary_attention`` on flat projections (4 query heads, 2 key/value heads, a causal mask; with
    ``qk_norm`` each head normalised first) against jax.nn's attention of the normalised, rotated, head-shaped
    arrays (with dropout: this module's attention of them, which the test above checks against the explicit
    formula): values and the gradients of q, k, v and the norms' scales."""
    ks = jax.random.split(jax.random.key(11), 7)
    q, w = (jax.random.normal(kk, (B, T, 4 * D)) for kk in ks[:2])
    k, v = (jax.random.normal(kk, (B, T, 2 * D)) for kk in ks[2:4])
    qs, kscale = (0.3 * jax.random.normal(kk, (D,)) for kk in ks[5:7])
    angles = jax.random.uniform(ks[4], (B, T, D // 2), maxval=6.0)
    cos, sin = jnp.cos(jnp.concatenate([angles] * 2, -1)), jnp.sin(jnp.concatenate([angles] * 2, -1))
    mask = jnp.tril(jnp.ones((T, T), bool))[None, None]
    kw = dict(dropout_rate=0.25, dropout_rng=jax.random.key(2)) if dropout else {}

    def ours(q, k, v, qs, kscale, cos=cos, sin=sin):
        norm = (_head_norm, qs, kscale) if qk_norm else None
        return jnp.sum(w * rotary_attention(q, k, v, cos, sin, 4, 2, mask=mask, scale=0.3, qk_norm=norm, **kw))

    def ref(q, k, v, qs, kscale):
        qh, kh = q.reshape(B, T, 4, D), k.reshape(B, T, 2, D)
        if qk_norm:
            qh, kh = _head_norm(qh, qs), _head_norm(kh, kscale)
        qh, kh = _rope_reference(qh, cos, sin), _rope_reference(kh, cos, sin)
        attn = dot_product_attention if dropout else jax.nn.dot_product_attention
        out = attn(qh, kh, v.reshape(B, T, 2, D), mask=mask, scale=0.3, **kw)
        return jnp.sum(w * out.reshape(B, T, 4 * D))

    argnums = (0, 1, 2, 3, 4) if qk_norm else (0, 1, 2)
    got = jax.value_and_grad(ours, argnums)(q, k, v, qs, kscale)
    want = jax.value_and_grad(ref, argnums)(q, k, v, qs, kscale)
    np.testing.assert_allclose(got[0], want[0], **TOL)
    for name, a, b in zip(["q", "k", "v", "q_scale", "k_scale"], got[1], want[1], strict=False):
        assert float(jnp.max(jnp.abs(b))) > 1e-3, name
        np.testing.assert_allclose(a, b, **TOL, err_msg=name)
    unrotated = ours(q, k, v, qs, kscale, cos=jnp.ones_like(cos), sin=jnp.zeros_like(sin))
    assert abs(float(unrotated - got[0])) > 1e-3  # the rotation did something


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("rotary", [False, True])
def test_soft_capped_logits_are_the_explicit_formula(rotary: bool, dropout: bool):
    """Gemma 2's ``softmax(c tanh(Q K^T scale / c) + mask) V`` (4 query heads, 2 key/value heads, causal mask,
    ``c = 2`` where the logits reach ~5, so the cap bends most of them), through both entry points, against
    autodiff of the explicit formula in float64 (with dropout: the same keep mask, drawn as the module draws
    it): values and the gradients of q, k, v. float32 against float64: TOL as above."""
    ks = jax.random.split(jax.random.key(13), 5)
    q, w = (jax.random.normal(kk, (B, T, 4, D)) for kk in ks[:2])
    k, v = (jax.random.normal(kk, (B, T, 2, D)) for kk in ks[2:4])
    angles = jax.random.uniform(ks[4], (B, T, D // 2), maxval=6.0)
    cos, sin = jnp.cos(jnp.concatenate([angles] * 2, -1)), jnp.sin(jnp.concatenate([angles] * 2, -1))
    mask = jnp.tril(jnp.ones((T, T), bool))[None, None]
    cap, scale, rate, key = 2.0, 0.6, 0.25, jax.random.key(4)
    kw = dict(dropout_rate=rate, dropout_rng=key) if dropout else {}

    def ours(q, k, v, softcap=cap):
        if rotary:
            out = rotary_attention(
                q.reshape(B, T, 4 * D), k.reshape(B, T, 2 * D), v.reshape(B, T, 2 * D), cos, sin, 4, 2,
                mask=mask, scale=scale, logit_softcap=softcap, **kw,
            ).reshape(B, T, 4, D)
        else:
            out = dot_product_attention(q, k, v, mask=mask, scale=scale, logit_softcap=softcap, **kw)
        return jnp.sum(w * out)

    def explicit(q, k, v):
        w64, c64, s64 = (jnp.asarray(np.asarray(t), jnp.float64) for t in (w, cos, sin))
        if rotary:
            q, k = _rope_reference(q, c64, s64), _rope_reference(k, c64, s64)
        k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)  # query head h reads h // 2
        logits = cap * jnp.tanh(jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale / cap)
        probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
        if dropout:
            probs = jnp.where(keep, probs / (1.0 - rate), 0.0)
        return jnp.sum(w64 * jnp.einsum("bhqk,bkhd->bqhd", probs, v))

    keep = np.asarray(jax.random.bernoulli(key, 1.0 - rate, (B, 4, T, T)))  # drawn in float32, as the module does
    got = jax.value_and_grad(ours, (0, 1, 2))(q, k, v)
    with jax.enable_x64():
        value, grads = jax.value_and_grad(explicit, (0, 1, 2))(*(np.asarray(t, np.float64) for t in (q, k, v)))
        want = float(value), [np.asarray(g) for g in grads]
    np.testing.assert_allclose(got[0], want[0], **TOL)
    for name, a, b in zip("qkv", got[1], want[1], strict=True):
        assert b.dtype == np.float64 and np.abs(b).max() > 1e-3, name
        np.testing.assert_allclose(a, b, **TOL, err_msg=name)
    uncapped = jax.grad(ours)(q, k, v, softcap=None)
    assert float(jnp.max(jnp.abs(uncapped - got[1][0]))) > 1e-2  # the cap did bend the logits


def test_bad_shapes_and_rates_are_named():
    q, k, v, _ = _qkv()
    with pytest.raises(ValueError, match="expected q"):
        dot_product_attention(q, k[..., :1], v)
    with pytest.raises(ValueError, match="K dividing H"):
        dot_product_attention(jnp.zeros((B, T, 3, D)), k, v)  # 3 query heads, 2 key/value heads
    with pytest.raises(ValueError, match="bias must be 4-D"):
        dot_product_attention(q, k, v, bias=jnp.zeros((B, T)))
    with pytest.raises(ValueError, match="mask must be 4-D"):
        dot_product_attention(q, k, v, mask=jnp.ones((B, 1, T, T + 1), bool))
    with pytest.raises(ValueError, match="dropout_rate"):
        dot_product_attention(q, k, v, dropout_rate=1.0)
    with pytest.raises(ValueError, match="logit_softcap must be > 0"):
        dot_product_attention(q, k, v, logit_softcap=0.0)
    flat, cos = jnp.zeros((B, T, 4 * D)), jnp.zeros((B, T, D))
    with pytest.raises(ValueError, match="expected q"):
        rotary_attention(flat, flat[..., : 3 * D], flat[..., : 3 * D], cos, cos, 4, 2)  # k, v not 2 heads wide
    with pytest.raises(ValueError, match="cos and sin"):
        rotary_attention(flat, flat[..., : 2 * D], flat[..., : 2 * D], cos[..., :2], cos[..., :2], 4, 2)


def _stack_temp_bytes(attn, layers: int, shape: tuple[int, int, int, int]) -> int:
    """Temp bytes of the input gradient of ``layers`` blocks ``x <- attn(q, k, v) + q k v`` (``q, k, v``
    projections of ``x``): the product keeps ``q, k, v`` for its own gradient, as an adapted projection
    that keeps its output does."""
    b, t, h, d = shape

    def f(x, W):
        for i in range(layers):
            q, k, v = (jnp.einsum("bthd,hde->bthe", x, W[i, j]) for j in range(3))
            x = attn(q, k, v) + q * k * v
        return jnp.sum(x * x)

    x, W = jnp.ones(shape), jnp.full((layers, 3, h, d, d), 0.01)
    return int(jax.jit(jax.grad(f)).lower(x, W).compile().memory_analysis().temp_size_in_bytes)


def test_backward_keeps_the_probabilities_and_shares_q_k_v():
    """Per block, the backward pass keeps one ``(B, H, T, T)`` tensor and ``q, k, v`` as they are (shared
    with what others keep), not transposed copies of them: XLA's memory grows by at most
    ``P + 4 (B, T, H, D) + 4 (B, H, T)`` per block (``jax.nn.dot_product_attention``'s XLA form: ~2.2x ``P``
    more; without tying the backward's transposes to the cotangent: ~0.8x ``P`` more)."""
    shape = (4, 64, 4, 16)
    b, t, h, d = shape
    P, qkv, row = b * h * t * t * 4, b * t * h * d * 4, b * h * t * 4
    per_block = (_stack_temp_bytes(dot_product_attention, 6, shape)
                 - _stack_temp_bytes(dot_product_attention, 2, shape)) / 4
    assert per_block <= P + 4 * qkv + 4 * row, per_block / P


def test_backend_switch_fused_path_equals_the_custom_one(monkeypatch):
    """On a CPU the custom form runs; ``SORA_JAX_ATTENTION=fused`` (the GPU default without dropout) hands the
    call to ``jax.nn.dot_product_attention`` with the same mask, bias and grouped heads: the same values and
    gradients. Dropout always stays custom; an unknown setting is one clear error."""
    from sora_jax.models import attention

    assert jax.default_backend() != "gpu" and attention.implementation() == "custom"
    ks = jax.random.split(jax.random.key(3), 5)
    q, w = (jax.random.normal(kk, (B, T, 4, D)) for kk in ks[:2])
    k, v = (jax.random.normal(kk, (B, T, 2, D)) for kk in ks[2:4])
    bias = jax.random.normal(ks[4], (1, 4, T, T))
    mask = jnp.tril(jnp.ones((T, T), bool))[None, None]

    def run():
        f = lambda q, k, v: jnp.sum(w * dot_product_attention(q, k, v, bias=bias, mask=mask, scale=0.3))  # noqa: E731
        return jax.value_and_grad(f, (0, 1, 2))(q, k, v)

    custom = run()
    calls = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("SORA_JAX_ATTENTION", "fused")
    assert attention.implementation() == "fused" and attention.implementation(dropout=True) == "custom"
    fused = run()
    assert calls
    np.testing.assert_allclose(fused[0], custom[0], **TOL)
    for a, b in zip(fused[1], custom[1], strict=True):
        np.testing.assert_allclose(a, b, **TOL)
    monkeypatch.setenv("SORA_JAX_ATTENTION", "flash")
    with pytest.raises(ValueError, match="SORA_JAX_ATTENTION='flash'; choose one of auto, custom, fused"):
        attention.implementation()
