"""Adapters on the Flax BERT against PEFT, and the exports (merged transformers model, PEFT adapter).

References are torch: ``transformers`` + ``peft`` 0.21 in float32. Tolerance 1e-4 max abs on the
logits: both sides compute the same float32 function (PEFT runs adapters on activations, we run
either the weight-space form or ``adapted_dense``), so they differ by summation order only (~1e-6
here); a transposed factor, a wrong scale or a misplaced norm changes the logits by > 1e-2 with the
non-zero adapters used below.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from model_fixtures import batch, save, tiny_tokenizer, torch_forward, torch_model
from safetensors import safe_open

import sora_jax
from sora_jax import convert, export
from sora_jax.export import export_merged, export_peft_adapter
from sora_jax.hub import load_pretrained

TOL = 1e-4
SIX = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _random_adapter(params, config, seed=0):
    """``init_adapter`` then every leaf moved away from its init (B != 0, d != 1, m != colnorm, C != D),
    so that every part of the method contributes to the output."""
    adapter = sora_jax.init_adapter(jax.random.key(seed), params, config)
    key = jax.random.key(seed + 100)
    layers = {}
    for path, leaves in sorted(adapter.layers.items()):
        new = {}
        for name, v in sorted(leaves.items()):
            key, k = jax.random.split(key)
            noise = jax.random.normal(k, v.shape, v.dtype)
            if name == "B":
                new[name] = 0.2 * noise
            elif name in ("m", "d"):
                new[name] = v * (1.0 + 0.2 * noise)
            elif name in ("C", "D"):
                new[name] = v + 0.3 * noise / np.sqrt(v.shape[0])
            else:
                new[name] = v
        layers[path] = new
    return sora_jax.Adapter(adapter.config, layers)


def _perturbed_head(params, seed=1):
    """A copy of ``params`` whose ``classifier`` subtree is changed (as if trained)."""
    key = jax.random.key(seed)
    head = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(key, v.shape), params["classifier"])
    return {**params, "classifier": head}


def _module_name(path: str) -> str:
    return convert.hf_key((*path.split("/"), "kernel")).removesuffix(".weight")


# initializer_range 0.2 (not 0.02): logits then depend strongly on every layer, so a wrong adapter
# term moves them far beyond the tolerance
INIT = 0.2


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save(torch_model("bert", initializer_range=INIT), tmp_path_factory.mktemp("bert") / "m")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_matches_peft_model(method, bert_dir):
    """The same non-zero LoRA/DoRA weights through PEFT on the torch model and through
    ``apply_adapter`` / ``adapted_dense`` on ours give the same logits."""
    model = load_pretrained(bert_dir)
    cfg = sora_jax.AdapterConfig(method=method, r=4, lora_alpha=8, target_modules=SIX)
    adapter = _random_adapter(model.params, cfg)
    tm = transformers.AutoModelForSequenceClassification.from_pretrained(str(bert_dir)).eval()
    pm = peft.get_peft_model(
        tm, peft.LoraConfig(r=4, lora_alpha=8, target_modules=SIX, use_dora=method == "dora", lora_dropout=0.0)
    ).eval()
    named = dict(pm.named_parameters())
    n_set = 0
    with torch.no_grad():
        for path, leaves in adapter.layers.items():
            base = f"base_model.model.{_module_name(path)}"
            named[f"{base}.lora_A.default.weight"].copy_(torch.tensor(np.asarray(leaves["A"]).T))
            named[f"{base}.lora_B.default.weight"].copy_(torch.tensor(np.asarray(leaves["B"]).T))
            n_set += 2
            if method == "dora":
                named[f"{base}.lora_magnitude_vector.default.weight"].copy_(torch.tensor(np.asarray(leaves["m"])))
                n_set += 1
    assert n_set == len([k for k in named if ".lora_" in k]) == (3 if method == "dora" else 2) * 12
    b = batch(model.config)
    ref = torch_forward(pm, b).logits
    weight_space = model.apply(sora_jax.apply_adapter(model.params, adapter), **b)["logits"]
    activations = model.apply(model.params, dense_fn=sora_jax.adapted_dense(adapter), **b)["logits"]
    assert _err(weight_space, ref) < TOL
    assert _err(activations, ref) < TOL
    assert _err(model.apply(model.params, **b)["logits"], ref) > 1e-2  # the adapter matters (>> TOL)


@pytest.mark.parametrize("kind,method", [("bert", "sora"), ("roberta", "dora")])
def test_export_merged_loads_in_transformers(kind, method, tmp_path):
    model = load_pretrained(save(torch_model(kind, initializer_range=INIT), tmp_path / "base"))
    model = dataclasses.replace(model, tokenizer=tiny_tokenizer(tmp_path / "tok"))
    cfg = sora_jax.AdapterConfig(method=method, r=4, lora_alpha=8, target_modules=SIX, modules_to_save=["classifier"])
    adapter = _random_adapter(model.params, cfg)
    params = _perturbed_head(model.params)
    out = export_merged(model, params, adapter, tmp_path / "merged")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".msgpack")) for n in names)
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
    cls = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification"}[kind]
    assert json.loads((out / "config.json").read_text())["architectures"] == [cls]
    tm, info = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), output_loading_info=True)
    assert all(not v for v in info.values()), info  # no missing / unexpected / mismatched keys
    b = batch(model.config)
    unmerged = model.apply(params, dense_fn=sora_jax.adapted_dense(adapter), **b)["logits"]
    assert _err(torch_forward(tm.eval(), b).logits, unmerged) < TOL
    assert _err(model.apply(params, **b)["logits"], unmerged) > 1e-2  # the adapter matters (>> TOL)
    assert transformers.AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids("w7") == 12


def test_export_merged_base_task_without_adapter(tmp_path):
    tm = torch_model("bert", "base")
    model = load_pretrained(save(tm, tmp_path / "base"), task="base")
    out = export_merged(model, model.params, None, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    loaded, info = transformers.AutoModel.from_pretrained(str(out), output_loading_info=True)
    assert all(not v for v in info.values()), info
    b = batch(model.config)
    assert _err(torch_forward(loaded.eval(), b).pooler_output, torch_forward(tm, b).pooler_output) == 0.0


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_export_peft_adapter_loads_in_peft(method, bert_dir, tmp_path):
    model = load_pretrained(bert_dir)
    cfg = sora_jax.AdapterConfig(
        method=method,
        r=4,
        lora_alpha=8,
        target_modules=SIX,
        rank_pattern={"value": 2},
        alpha_pattern={"key": 3.0},
        modules_to_save=["classifier"],
    )
    adapter = _random_adapter(model.params, cfg)
    params = _perturbed_head(model.params)
    out = export_peft_adapter(model, adapter, tmp_path / "adapter", params=params)
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["use_dora"] == (method == "dora")
    assert written["modules_to_save"] == ["classifier"] and len(written["target_modules"]) == 12
    with safe_open(str(out / "adapter_model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        key = "base_model.model.bert.encoder.layer.0.attention.self.value"
        assert f.get_tensor(f"{key}.lora_A.weight").shape == (2, 32)
        assert f.get_tensor(f"{key}.lora_B.weight").shape == (32, 2)
        if method == "dora":
            assert f.get_tensor(f"{key}.lora_magnitude_vector").shape == (32,)
        assert f.get_tensor("base_model.model.classifier.weight").shape == (3, 32)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(str(bert_dir))
    pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    b = batch(model.config)
    ours = model.apply(params, dense_fn=sora_jax.adapted_dense(adapter), **b)["logits"]
    assert _err(torch_forward(pm, b).logits, ours) < TOL
    assert _err(model.apply(params, **b)["logits"], ours) > 1e-2  # the adapter matters (>> TOL)


def test_export_peft_adapter_refuses_methods_without_peft_layout(bert_dir, tmp_path):
    model = load_pretrained(bert_dir)
    adapter = sora_jax.init_adapter(
        jax.random.key(0), model.params, sora_jax.AdapterConfig(method="sora", r=2, target_modules=["query"])
    )
    with pytest.raises(ValueError, match=r"method 'sora' has no PEFT layout.*sora_jax.save_adapter"):
        export_peft_adapter(model, adapter, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_exports_are_atomic(bert_dir, tmp_path, monkeypatch):
    model = load_pretrained(bert_dir)
    out = tmp_path / "out"

    def failing_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "save_file", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        export_merged(model, model.params, None, out)  # config.json was already written when it failed
    assert os.listdir(tmp_path) == []  # no out_dir, no temporary directory left behind
    monkeypatch.undo()
    export_merged(model, model.params, None, out)
    before = sorted(os.listdir(out))
    monkeypatch.setattr(export, "save_file", failing_save)
    cfg = sora_jax.AdapterConfig(method="lora", r=2, target_modules=["query"])
    adapter = sora_jax.init_adapter(jax.random.key(0), model.params, cfg)
    with pytest.raises(RuntimeError, match="disk full"):
        export_merged(model, model.params, adapter, out)
    assert sorted(os.listdir(out)) == before and os.listdir(tmp_path) == ["out"]  # the old export intact
    monkeypatch.undo()
    export_peft_adapter(model, adapter, out)  # replacing an existing directory
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_merged_bfloat16_params_keep_dtype(bert_dir, tmp_path):
    model = load_pretrained(bert_dir, param_dtype=jnp.bfloat16)
    out = export_merged(model, model.params, None, tmp_path / "m")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("classifier.weight").dtype == torch.bfloat16
