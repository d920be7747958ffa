"""Dropout masks (``sora_jax.dropout``) against ``jax.random.bernoulli`` and Flax's ``nn.Dropout``.

Exact equality throughout: the masks are integer hashes and comparisons, so any difference in the
hash, the counter layout or the float conversion changes some of the ``10**4`` - ``10**5`` bits compared.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_fixtures import batch, save, torch_model

from sora_jax import dropout
from sora_jax.hub import load_pretrained
from sora_jax.models import bert, common

CASES = [((1,), 0.5), ((7,), 0.0), ((3, 5), 1.0), ((2, 3, 17, 19), 0.1), ((4, 64, 96), 0.9), ((5, 301), 0.5)]


@pytest.mark.parametrize("shape, p", CASES)
def test_bernoulli_is_jax_random_bernoulli(shape, p):
    ours = jax.jit(dropout.bernoulli, static_argnums=(1, 2))
    for key in (jax.random.key(0), jax.random.fold_in(jax.random.key(7), 3), jax.random.PRNGKey(11)):
        np.testing.assert_array_equal(np.asarray(ours(key, p, shape)), np.asarray(jax.random.bernoulli(key, p, shape)))
    if 0.0 < p < 1.0 and np.prod(shape) > 100:  # not constant: the comparison above could fail
        assert 0 < float(np.mean(np.asarray(ours(key, p, shape)))) < 1


def test_bernoulli_under_vmap_and_scan_keys():
    """A scanned model's blocks draw from a batch of keys (one per block)."""
    keys = jax.random.split(jax.random.key(3), 5)
    ours = jax.jit(jax.vmap(lambda k: dropout.bernoulli(k, 0.8, (6, 33))))(keys)
    ref = jax.jit(jax.vmap(lambda k: jax.random.bernoulli(k, 0.8, (6, 33))))(keys)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))

    def body(c, k):
        return c, dropout.bernoulli(k, 0.7, (4, 9))

    _, scanned = jax.jit(lambda ks: jax.lax.scan(body, 0, ks))(keys)
    ref = jax.jit(jax.vmap(lambda k: jax.random.bernoulli(k, 0.7, (4, 9))))(keys)
    np.testing.assert_array_equal(np.asarray(scanned), np.asarray(ref))


def test_other_generators_fall_back_to_jax():
    for impl in ("rbg", "unsafe_rbg"):
        key = jax.random.key(0, impl=impl)
        np.testing.assert_array_equal(
            np.asarray(dropout.bernoulli(key, 0.9, (8, 8))), np.asarray(jax.random.bernoulli(key, 0.9, (8, 8)))
        )


def test_threefry_hash_is_written_out():
    """The mask compiles to straight-line code: no loop (JAX's own CPU lowering of the hash is a
    five-step ``while`` over arrays of the mask's size, the cost this module removes)."""
    text = jax.jit(lambda k: dropout.bernoulli(k, 0.9, (32, 12, 128, 128))).lower(jax.random.key(0)).as_text()
    assert "threefry" not in text and "while" not in text


@pytest.mark.parametrize("rate, broadcast_dims", [(0.1, ()), (0.5, (1,)), (0.3, (0, 2)), (0.0, ()), (1.0, ())])
def test_dropout_module_is_flax_dropout(rate, broadcast_dims):
    class Net(nn.Module):
        cls: type

        @nn.compact
        def __call__(self, x, deterministic):
            x = self.cls(rate, broadcast_dims=broadcast_dims)(x, deterministic=deterministic)
            return self.cls(rate)(2.0 * x, deterministic=deterministic)  # a second site: its own key

    x = jax.random.normal(jax.random.key(1), (4, 6, 10)) + 3.0
    rngs = {"dropout": jax.random.key(5)}
    ours = jax.jit(lambda x: Net(common.Dropout).apply({}, x, False, rngs=rngs))(x)
    ref = jax.jit(lambda x: Net(nn.Dropout).apply({}, x, False, rngs=rngs))(x)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(Net(common.Dropout).apply({}, x, True)), np.asarray(2.0 * x))
    if 0 < rate < 1:
        assert 0 < float(np.mean(np.asarray(ours) == 0)) < 1


def test_bert_training_forward_keeps_its_masks(tmp_path, monkeypatch):
    """A BERT forward with dropout (hidden and attention) gives the values it gave with Flax's and JAX's
    own dropout: runs trained before keep their masks."""
    tm = torch_model("bert", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    model = load_pretrained(save(tm, tmp_path / "m"))
    b = batch(tm.config)

    def logits():  # traced anew on each call: sees the patched functions
        fn = jax.jit(lambda p, b: model.apply(p, deterministic=False, rngs={"dropout": jax.random.key(4)}, **b)["logits"])
        return np.asarray(fn(model.params, b))

    ours = logits()
    monkeypatch.setattr(bert, "Dropout", nn.Dropout)
    monkeypatch.setattr(dropout, "bernoulli", jax.random.bernoulli)
    ref = logits()
    np.testing.assert_array_equal(ours, ref)
    assert np.abs(ours - np.asarray(model.apply(model.params, **b)["logits"])).max() > 1e-3  # dropout acted


def test_lora_dropout_mask_is_jax_bernoulli():
    x = jnp.arange(1.0, 1.0 + 4 * 33).reshape(4, 33)
    key = jax.random.key(9)
    out = dropout.dropout(x, 0.25, key)
    keep = jax.random.bernoulli(key, 0.75, x.shape)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.where(keep, x / 0.75, 0.0)))
    assert dropout.dropout(x, 0.25, None) is x


def test_the_older_threefry_layout_falls_back_to_jax():
    """With ``jax_threefry_partitionable`` off JAX lays the counters out otherwise: the masks must still be
    JAX's (the written-out hash over flat indices would differ)."""
    key = jax.random.key(2)
    with jax.threefry_partitionable(False):
        ours = np.asarray(dropout.bernoulli(key, 0.6, (9, 13)))
        ref = np.asarray(jax.random.bernoulli(key, 0.6, (9, 13)))
    np.testing.assert_array_equal(ours, ref)
