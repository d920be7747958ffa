"""Scanned layers (``scan_layers=True``): the same model as the unrolled one, compiled once per block.

References: the unrolled sora-jax model (itself checked against ``transformers``) and ``transformers``'
torch models. Tolerances: float32 forward passes of a few layers agree to ~1e-6 (different but
equivalent XLA programs); gradients through three layers to 1e-5 relative to their scale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import sora_jax
from sora_jax import convert, hub
from sora_jax.generate import greedy_generate
from tests import model_fixtures as mf
from tests.test_glue_cli import glue_cli, mrpc_dir, tiny_args, tiny_model_dir  # noqa: F401 (fixtures)

LAYERS = 3
METHODS = ("dora", "sora")  # the slicing is method-agnostic: a normalised diagonal, and a diagonal + rotation


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return mf.save(mf.torch_model("bert", num_hidden_layers=LAYERS), tmp_path_factory.mktemp("bert") / "m")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # large enough that greedy decoding does not repeat one token
    return mf.save(model, tmp_path_factory.mktemp("llama") / "m")


def _random_like(tree, seed: int):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)])


def _stacked_adapter(unrolled: sora_jax.Adapter, stacked_template: sora_jax.Adapter, stack: str) -> sora_jax.Adapter:
    """The unrolled adapter's per-layer leaves stacked at ``stack`` (the reference's own values)."""
    layers = {}
    for path in stacked_template.layers:
        if path.startswith(stack + "/"):
            rest = path[len(stack) :]
            per = [unrolled.layers[f"{stack}_{i}{rest}"] for i in range(LAYERS)]
            layers[path] = {k: jnp.stack([p[k] for p in per]) for k in per[0]}
        else:
            layers[path] = unrolled.layers[path]
    return sora_jax.Adapter(stacked_template.config, layers)


def test_stack_unstack_round_trip():
    params = {"m": {"layer_0": {"k": np.arange(6.0).reshape(2, 3)}, "layer_1": {"k": -np.arange(6.0).reshape(2, 3)},
                    "other": {"k": np.ones(2)}}}  # fmt: skip
    stacked = convert.stack_layers(params, "m/layer")
    assert set(stacked["m"]) == {"layer", "other"} and stacked["m"]["layer"]["k"].shape == (2, 2, 3)
    back = convert.unstack_layers(stacked, "m/layer")
    assert jax.tree.all(jax.tree.map(np.array_equal, back, params))
    with pytest.raises(KeyError, match="not 0..2"):
        convert.stack_layers({"m": {"layer_0": {}, "layer_1": {}, "layer_3": {}}}, "m/layer")


def test_bert_scanned_equals_unrolled_and_transformers(bert_dir: Path):
    unrolled = hub.load_pretrained(bert_dir, load_tokenizer=False)
    scanned = hub.load_pretrained(bert_dir, load_tokenizer=False, scan_layers=True)
    assert scanned.stacked == "bert/encoder/layer"
    assert scanned.params["bert"]["encoder"]["layer"]["attention"]["self"]["query"]["kernel"].shape == (LAYERS, 32, 32)
    assert not any(k.startswith("layer_") for k in scanned.params["bert"]["encoder"])
    cfg = transformers.AutoConfig.from_pretrained(bert_dir)
    b = mf.batch(cfg)
    ref = mf.torch_forward(transformers.AutoModelForSequenceClassification.from_pretrained(bert_dir).eval(), b)
    got = np.asarray(scanned.apply(scanned.params, **b)["logits"])
    np.testing.assert_allclose(got, ref.logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(got, np.asarray(unrolled.apply(unrolled.params, **b)["logits"]), atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "sora"])
def test_scanned_init_draws_what_unrolled_draws(bert_dir: Path, method: str):
    """A stacked module's block i gets the initial values (random A; SORA's C = D) of layer i's module in
    the unrolled model, so scanning changes no result; a PyTorch-style path numbers the same way."""
    unrolled = hub.load_pretrained(bert_dir, load_tokenizer=False)
    scanned = hub.load_pretrained(bert_dir, load_tokenizer=False, scan_layers=True)
    targets = ["query", "value"]
    au = sora_jax.init_adapter(jax.random.key(3), unrolled.params,
                               sora_jax.AdapterConfig(method=method, r=4, target_modules=targets))
    as_ = sora_jax.init_adapter(jax.random.key(3), scanned.params, sora_jax.AdapterConfig(
        method=method, r=4, target_modules=targets, kernel_axes=scanned.kernel_axes()))
    want = _stacked_adapter(au, as_, scanned.stacked)
    assert sorted(as_.layers) == sorted(want.layers) and len(as_.layers) == 2
    for path, leaves in as_.layers.items():
        for k, v in leaves.items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(want.layers[path][k]), err_msg=f"{path}/{k}")
    a = np.asarray(as_.layers["bert/encoder/layer/attention/self/query"]["A"])
    assert not np.array_equal(a[0], a[1])  # the blocks differ
    key = jax.random.key(0)
    same = [sora_jax.adapter.module_key(key, p) for p in ("m/layers_3/q", "m/layers/3/q")]
    other = [sora_jax.adapter.module_key(key, p) for p in ("m/layers_4/q", "m/layers_3/k", "m/layers/q")]
    data = [np.asarray(jax.random.key_data(k)) for k in same + other]
    assert np.array_equal(data[0], data[1])
    assert all(not np.array_equal(data[0], d) for d in data[2:])


@pytest.mark.parametrize("method", METHODS)
def test_activation_path_gradients_equal_unrolled(bert_dir: Path, method: str):
    """Loss and every adapter gradient of the scanned model (stacked leaves, sliced per block inside the scan)
    equal the unrolled model's per-layer ones; the weight path on stacked kernels agrees too."""
    unrolled = hub.load_pretrained(bert_dir, load_tokenizer=False)
    scanned = hub.load_pretrained(bert_dir, load_tokenizer=False, scan_layers=True)
    targets = ["query", "value", "dense"]
    cu = sora_jax.AdapterConfig(method=method, r=4, rotation_rank=2, target_modules=targets)
    cs = sora_jax.AdapterConfig(method=method, r=4, rotation_rank=2, target_modules=targets,
                                kernel_axes=scanned.kernel_axes())  # fmt: skip
    au = _random_like(sora_jax.init_adapter(jax.random.key(1), unrolled.params, cu), seed=2)
    as_ = _stacked_adapter(au, sora_jax.init_adapter(jax.random.key(1), scanned.params, cs), scanned.stacked)
    b = mf.batch(transformers.AutoConfig.from_pretrained(bert_dir))

    def loss_of(model):
        def loss(adapter):
            logits = model.apply(model.params, dense_fn=sora_jax.adapted_dense(adapter), **b)["logits"]
            return jnp.sum(logits * jnp.arange(1.0, 1.0 + logits.size).reshape(logits.shape))

        return jax.jit(jax.value_and_grad(loss))

    lu, gu = loss_of(unrolled)(au)
    ls, gs = loss_of(scanned)(as_)
    np.testing.assert_allclose(float(ls), float(lu), rtol=1e-5)
    want = _stacked_adapter(gu, gs, scanned.stacked)
    for path in gs.layers:
        for k in gs.layers[path]:
            g, w = np.asarray(gs.layers[path][k]), np.asarray(want.layers[path][k])
            np.testing.assert_allclose(g, w, atol=1e-5 * max(1.0, np.abs(w).max()), err_msg=f"{path}/{k}")
    weight = scanned.apply(sora_jax.apply_adapter(scanned.params, as_), **b)["logits"]
    act = scanned.apply(scanned.params, dense_fn=sora_jax.adapted_dense(as_), **b)["logits"]
    np.testing.assert_allclose(np.asarray(weight), np.asarray(act), atol=1e-5)


def test_remat_changes_nothing_numerically(llama_dir: Path):
    plain = hub.load_pretrained(llama_dir, task="causal_lm", load_tokenizer=False, scan_layers=True)
    remat = hub.load_pretrained(llama_dir, task="causal_lm", load_tokenizer=False, scan_layers=True, remat="full")
    cfg = sora_jax.AdapterConfig(method="sora", r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                 kernel_axes=plain.kernel_axes())  # fmt: skip
    a = _random_like(sora_jax.init_adapter(jax.random.key(0), plain.params, cfg), seed=3)
    ids = np.random.default_rng(0).integers(3, 128, (2, 9))

    def grad_of(model):
        def loss(adapter):
            return model.apply(model.params, dense_fn=sora_jax.adapted_dense(adapter), input_ids=ids)["logits"].std()

        return jax.jit(jax.grad(loss))

    g1, g2 = grad_of(plain)(a), grad_of(remat)(a)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6 * max(1.0, float(jnp.abs(x).max())))
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g1))


def test_llama_scanned_logits_generation_and_export(llama_dir: Path, tmp_path: Path):
    unrolled = hub.load_pretrained(llama_dir, task="causal_lm", load_tokenizer=False)
    scanned = hub.load_pretrained(llama_dir, task="causal_lm", load_tokenizer=False, scan_layers=True)
    assert scanned.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (LAYERS, 32, 32)
    ids = np.random.default_rng(0).integers(3, 128, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    lu = unrolled.apply(unrolled.params, input_ids=ids, attention_mask=mask)["logits"]
    ls = scanned.apply(scanned.params, input_ids=ids, attention_mask=mask)["logits"]
    np.testing.assert_allclose(np.asarray(ls), np.asarray(lu), atol=1e-5)
    # decoding with the key/value cache: the same greedy tokens
    gu = greedy_generate(unrolled.module, unrolled.params, ids, mask, max_new_tokens=6, eos_token_id=2)
    gs = greedy_generate(scanned.module, scanned.params, ids, mask, max_new_tokens=6, eos_token_id=2)
    np.testing.assert_array_equal(gs, gu)
    assert len(set(gu[0].tolist())) > 1
    # a merged export of the scanned model is Hugging Face's per-layer checkpoint
    cfg = sora_jax.AdapterConfig(method="sora", r=4, target_modules=["q_proj", "down_proj"],
                                 kernel_axes=scanned.kernel_axes())  # fmt: skip
    a = _random_like(sora_jax.init_adapter(jax.random.key(0), scanned.params, cfg), seed=4)
    out = sora_jax.export_merged(scanned, scanned.params, a, tmp_path / "merged")
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = scanned.apply(sora_jax.apply_adapter(scanned.params, a), input_ids=ids, attention_mask=mask)["logits"]
    np.testing.assert_allclose(np.asarray(got)[mask == 1], ref[mask == 1], atol=1e-4)


IDS = np.random.default_rng(0).integers(3, 128, (8, 64))  # the memory tests' batch


@pytest.fixture(scope="module")
def scanned_llama(llama_dir: Path):
    return hub.load_pretrained(llama_dir, task="causal_lm", load_tokenizer=False, scan_layers=True)


def _step_temp_bytes(
    model, method: str, targets: list[str], fused: bool | None = None, take_norm: bool = True
) -> int:
    """XLA's temporaries (compiled memory analysis: deterministic, not a timing) of the adapter gradient of a
    scanned causal LM's summed logits on :data:`IDS`. ``take_norm=False``: the dense function lacks the
    ``input_norm`` keyword, so the model hands the projections their normalised input."""
    cfg = sora_jax.AdapterConfig(method=method, r=4, target_modules=targets, kernel_axes=model.kernel_axes())
    adapter = sora_jax.init_adapter(jax.random.key(0), model.params, cfg)

    def loss(a):
        dense = sora_jax.adapted_dense(a, fused=fused)
        if not take_norm:
            inner = dense

            def dense(path, x, kernel, bias, input_act=None, layer=None, gate=None):
                return inner(path, x, kernel, bias, input_act=input_act, layer=layer, gate=gate)

        return model.apply(model.params, dense_fn=dense, input_ids=jnp.asarray(IDS))["logits"].sum()

    return jax.jit(jax.grad(loss)).lower(adapter).compile().memory_analysis().temp_size_in_bytes


def test_layers_reading_one_input_keep_one_copy_of_it(scanned_llama):
    """q, k and v read the same normalised input: in a scanned LoRA step the backward keeps one stacked
    copy of it, not one per layer (each kept value is stacked over the layers). Adding k and v to q must
    cost less than one more ``(L, tokens, hidden)`` float32 array (a copy each would cost two)."""
    one_copy = LAYERS * IDS.size * 32 * 4
    extra = _step_temp_bytes(scanned_llama, "lora", ["q_proj", "k_proj", "v_proj"]) - _step_temp_bytes(
        scanned_llama, "lora", ["q_proj"]
    )
    assert extra < one_copy, (extra, one_copy)


def test_gated_mlp_output_layer_keeps_no_product(scanned_llama):
    """``down_proj`` reads ``act(gate) * up``: handed both factors (``gate=``), an adapted ``down_proj``
    keeps the two arrays the product's own backward keeps, not the product as well. In a scanned LoRA
    step, adding ``down_proj`` to ``up_proj`` must cost less than one stacked ``(L, tokens, intermediate)``
    float32 array (keeping the product costs that much and more)."""
    one_copy = LAYERS * IDS.size * 64 * 4
    extra = _step_temp_bytes(scanned_llama, "lora", ["up_proj", "down_proj"]) - _step_temp_bytes(
        scanned_llama, "lora", ["up_proj"]
    )
    assert extra < one_copy, (extra, one_copy)


def test_projections_handed_the_norm_keep_its_input(scanned_llama):
    """q, k, v and up read pre-norm outputs. Handed the norm (``input_norm``), an adapted projection keeps
    the norm's input, the residual stream, which the norm's own backward keeps, and normalises again in its
    backward; handed the normalised input, it keeps that too. In a scanned LoRA step the norm must save more
    than one stacked ``(L, tokens, hidden)`` array (two norms' outputs; 4.5 arrays measured)."""
    targets = ["q_proj", "k_proj", "v_proj", "up_proj"]
    saved = _step_temp_bytes(scanned_llama, "lora", targets, take_norm=False) - _step_temp_bytes(
        scanned_llama, "lora", targets
    )
    assert saved > LAYERS * IDS.size * 32 * 4, saved


def test_fused_diagonal_keeps_its_output_once(scanned_llama):
    """A fused Pre-Diag layer keeps its output ``x W'`` for the diagonal's gradient. When the next operation
    keeps that output too (``up_proj``'s, kept by the gated product's backward), the scanned step keeps one
    stacked copy: Pre-Diag on ``up_proj`` costs less than half an ``(L, tokens, intermediate)`` float32 array
    over LoRA (keeping a reshaped copy of its own cost more than one)."""
    one_copy = LAYERS * IDS.size * 64 * 4
    extra = _step_temp_bytes(scanned_llama, "prediag", ["up_proj"], fused=True) - _step_temp_bytes(
        scanned_llama, "lora", ["up_proj"], fused=True
    )
    assert extra < one_copy / 2, (extra, one_copy)


def test_fused_diagonal_attention_projections_share_their_outputs(scanned_llama):
    """Fused Pre-Diag on q, k and v keeps their outputs ``x W'``; the attention keeps the same arrays
    (``rotary_attention`` rotates q and k in its backward instead of keeping rotated, head-shaped copies).
    Over LoRA, the scanned step keeps the diagonal's other residuals, at this width 0.9 of a stacked
    ``(L, tokens, q + k + v)`` float32 array (each layer's 8 exactly computed columns are half its width),
    and must keep less than 1.4 (a copy of each output, as rotated or reshaped values, is one array more:
    1.9 measured before)."""
    one_copy = LAYERS * IDS.size * (32 + 16 + 16) * 4
    targets = ["q_proj", "k_proj", "v_proj"]
    extra = _step_temp_bytes(scanned_llama, "prediag", targets, fused=True) - _step_temp_bytes(
        scanned_llama, "lora", targets, fused=True
    )
    assert extra < 1.4 * one_copy, (extra / one_copy, one_copy)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_gemma_attention_inside_keeps_the_projections_outputs(tmp_path: Path, kind: str):
    """Gemma 3 normalises each head of q and k before the rotation (QK-norm); Gemma 2 soft-caps the logits.
    ``rotary_attention`` applies both too, so fused Pre-Diag on q, k and v shares their outputs with the
    attention as in LLaMA: over LoRA, the scanned step must keep less than one stacked ``(L, tokens, q + k +
    v)`` float32 array (measured: Gemma 3 0.53, Gemma 2 0.56; when the norms ran outside by autodiff and the
    attention kept their outputs, Gemma 3 1.55; Gemma 2's soft-capped attention by autodiff, 1.61)."""
    from tests.test_gemma import CASES, hf_config, torch_model

    torch_model(hf_config(kind), CASES[kind][1]).save_pretrained(tmp_path)
    model = hub.load_pretrained(tmp_path, task="causal_lm", load_tokenizer=False, scan_layers=True)
    targets = ["q_proj", "k_proj", "v_proj"]
    kernels = [v.shape for kp, v in jax.tree_util.tree_leaves_with_path(model.params)
               if any(getattr(k, "key", None) in targets for k in kp) and getattr(kp[-1], "key", None) == "kernel"]
    assert len(kernels) == 3 and all(len(s) == 3 for s in kernels), kernels  # stacked (L, d_in, d_out)
    one_copy = kernels[0][0] * IDS.size * sum(s[-1] for s in kernels) * 4
    extra = _step_temp_bytes(model, "prediag", targets, fused=True) - _step_temp_bytes(
        model, "lora", targets, fused=True
    )
    assert extra < one_copy, (extra / one_copy, one_copy)


def test_unsupported_family_and_remat_without_scan_are_clear_errors(tmp_path: Path, bert_dir: Path):
    with pytest.raises(ValueError, match="remat='full' applies to scanned layers"):
        hub.load_pretrained(bert_dir, load_tokenizer=False, remat="full")
    deberta = transformers.DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=37, max_position_embeddings=40)  # fmt: skip
    torch.manual_seed(0)
    path = mf.save(transformers.DebertaV2ForSequenceClassification(deberta), tmp_path / "deberta")
    with pytest.raises(ValueError, match="scan_layers is not available for model_type 'deberta-v2'"):
        hub.load_pretrained(path, load_tokenizer=False, scan_layers=True)


def test_glue_cli_scan_layers_trains_as_unrolled(glue_cli, tmp_path: Path, tiny_model_dir: Path, mrpc_dir: Path):  # noqa: F811
    """``glue.py --scan-layers`` (dropout off): the same per-step losses as the unrolled run, and the
    spectrum in Hugging Face's per-layer names."""
    runs = {}
    for name, extra in {"unrolled": (), "scanned": ("--scan-layers",)}.items():
        argv = tiny_args(tiny_model_dir, mrpc_dir, tmp_path / name, "--method", "sora", "--epochs", "1",
                         "--no-dropout", "--no-progress", "--compile-cache", "none", *extra)  # fmt: skip
        assert glue_cli.main(argv) == 0
        log = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (
            [r["loss"] for r in log if "loss" in r],
            json.loads((tmp_path / name / "results.json").read_text()),
        )
    (lu, ru), (ls, rs) = runs["unrolled"], runs["scanned"]
    assert rs["config"]["scan_layers"] is True and ru["config"]["scan_layers"] is False
    assert len(ls) == len(lu) == 6
    # the same initial values (a stacked module's blocks draw what the unrolled layers draw), so the same
    # trajectory up to float32 summation order
    np.testing.assert_allclose(ls, lu, rtol=1e-4)
    assert sorted(rs["spectrum"]) == sorted(ru["spectrum"]) and len(rs["spectrum"]) == 12
    assert all(re.search(r"layer_\d+/", p) for p in rs["spectrum"])
    for v in rs["spectrum"].values():
        assert np.isfinite(v["entropy"]) and 1.0 <= v["stable_rank"] <= 16.0


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3_text"])
def test_gemma_scanned_equals_unrolled(tmp_path: Path, kind: str):
    """Gemma (one layer type: the rotary table and mask broadcast), Gemma 2 and Gemma 3 (sliding and full
    layers mixed: each block gets its own as scanned inputs): logits and cached greedy decoding as unrolled."""
    from tests.test_gemma import CASES, hf_config, torch_model

    torch_model(hf_config(kind), CASES[kind][1]).save_pretrained(tmp_path)
    unrolled = hub.load_pretrained(tmp_path, task="causal_lm", load_tokenizer=False)
    scanned = hub.load_pretrained(tmp_path, task="causal_lm", load_tokenizer=False, scan_layers=True)
    ids = np.random.default_rng(1).integers(3, 128, (2, 12))  # longer than the sliding window of 5
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    lu = unrolled.apply(unrolled.params, input_ids=ids, attention_mask=mask)["logits"]
    ls = scanned.apply(scanned.params, input_ids=ids, attention_mask=mask)["logits"]
    # logits of a few units: float32 rounding in another summation order, ~3e-6 relative
    np.testing.assert_allclose(np.asarray(ls), np.asarray(lu), rtol=1e-5, atol=1e-5)
    gu = greedy_generate(unrolled.module, unrolled.params, ids, mask, max_new_tokens=4)
    gs = greedy_generate(scanned.module, scanned.params, ids, mask, max_new_tokens=4)
    np.testing.assert_array_equal(gs, gu)
