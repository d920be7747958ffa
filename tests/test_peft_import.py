"""``load_peft_adapter``: PEFT LoRA/DoRA directories and the authors' SORA state dicts, against PyTorch.

Every adapter is made on the PyTorch side (PEFT with random, non-zero factors; a SORA layer written
here from docs/spec.md section 2), saved, read by sora_jax and run through our Flax model; the reference is
the PyTorch model's own output. Tolerance 1e-5 absolute on logits of O(1) (float32 on both sides through
a 2-layer, hidden-32 encoder; the observed error is ~1e-6).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from model_fixtures import batch, save, torch_forward, torch_model
from safetensors.torch import save_file

import sora_jax
from sora_jax.config import AdapterError
from sora_jax.hub import load_pretrained

TOL = 1e-5
INIT = 0.2  # large initial weights: every layer moves the logits, so a wrong term shows


def _err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save(torch_model("bert", initializer_range=INIT), tmp_path_factory.mktemp("bert") / "m")


def _peft_model(bert_dir, **lora_kw):
    torch.manual_seed(1)
    tm = torch_model("bert", initializer_range=INIT)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", init_lora_weights=False, lora_dropout=0.0, **lora_kw)
    pm = peft.get_peft_model(tm, cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))  # m away from colnorm(W + s A B)
            elif "modules_to_save" in name:
                p.add_(0.5 * torch.randn_like(p))  # a "trained" head
    return pm


CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], modules_to_save=["classifier"],
                 rank_pattern={"value": 2}, alpha_pattern={"layer.1.attention.self.query": 3}),
    "lora_rslora": dict(r=4, lora_alpha=8, target_modules=["query", "key"], use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], use_dora=True,
                 modules_to_save=["classifier"], rank_pattern={"intermediate.dense": 3}),
}


# the .bin reader (torch.load weights_only) once, with DoRA: the case with the most key kinds
@pytest.mark.parametrize(("case", "fmt"), [(c, "safetensors") for c in CASES] + [("dora", "bin")])
def test_peft_adapter_logits_equal_peft(case, fmt, bert_dir, tmp_path):
    pm = _peft_model(bert_dir, **CASES[case])
    pm.save_pretrained(str(tmp_path / "a"), safe_serialization=fmt == "safetensors")
    assert (tmp_path / "a" / f"adapter_model.{fmt}").is_file()
    model = load_pretrained(bert_dir)
    adapter, params = sora_jax.load_peft_adapter(tmp_path / "a", model)
    b = batch(model.config)
    ref = torch_forward(pm, b).logits
    got = model.apply(sora_jax.apply_adapter(params, adapter), **b)["logits"]
    act = model.apply(params, dense_fn=sora_jax.adapted_dense(adapter), **b)["logits"]
    print(f"{case}/{fmt}: weight path {_err(got, ref):.2e}, activation path {_err(act, ref):.2e}")
    assert _err(got, ref) < TOL, _err(got, ref)
    assert _err(act, ref) < TOL, _err(act, ref)
    # every part matters: without the adapter, or without the saved head, the logits are far off
    assert _err(model.apply(params, **b)["logits"], ref) > 1e-2
    if "modules_to_save" in CASES[case]:
        assert _err(model.apply(sora_jax.apply_adapter(model.params, adapter), **b)["logits"], ref) > 1e-2
        assert adapter.config.modules_to_save == ("classifier",)
    assert adapter.config.method == ("dora" if case == "dora" else "lora")
    n_modules = sum(1 for n, _ in pm.named_modules() if n.endswith("lora_A"))
    assert len(adapter.layers) == n_modules


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_export_then_load_is_exact(method, bert_dir, tmp_path):
    model = load_pretrained(bert_dir)
    cfg = sora_jax.AdapterConfig(method=method, r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"],
                                 rank_pattern={"layer_1/attention/self/value": 2}, alpha_pattern={"query": 5.0})
    adapter = sora_jax.init_adapter(jax.random.key(0), model.params, cfg)
    rng = np.random.default_rng(0)
    adapter = jax.tree.map(lambda v: jnp.asarray(v + 0.1 * rng.normal(size=v.shape), jnp.float32), adapter)
    head = jax.tree.map(lambda v: v + 0.1, model.params["classifier"])
    params = {**model.params, "classifier": head}
    sora_jax.export_peft_adapter(model, adapter, tmp_path / "a", params=params)
    back, back_params = sora_jax.load_peft_adapter(tmp_path / "a", model)
    assert set(back.layers) == set(adapter.layers)
    for path, lv in adapter.layers.items():
        assert back.config.scaling_for(path) == cfg.scaling_for(path), path
        for name, v in lv.items():
            np.testing.assert_array_equal(np.asarray(back.layers[path][name]), np.asarray(v), err_msg=f"{path}/{name}")
    jax.tree.map(np.testing.assert_array_equal, back_params, params)
    b = batch(model.config)
    np.testing.assert_array_equal(
        np.asarray(model.apply(sora_jax.apply_adapter(back_params, back), **b)["logits"]),
        np.asarray(model.apply(sora_jax.apply_adapter(params, adapter), **b)["logits"]),
    )


# -- any params tree, with a key map ---------------------------------------------------------------
class _TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 7)
        self.fc2 = torch.nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_any_params_tree_with_a_key_map(tmp_path):
    torch.manual_seed(0)
    tm = _TorchMLP()
    base = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    pm = peft.get_peft_model(tm, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], use_dora=True,
                                                 init_lora_weights=False)).eval()
    pm.save_pretrained(str(tmp_path / "a"))
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    with torch.no_grad():
        ref = pm(torch.tensor(x)).numpy()

    # a linen-style tree: kernels (d_in, d_out) under other names, reached through key_map
    linen = {"Dense_0": {"kernel": base["fc1.weight"].T, "bias": base["fc1.bias"]},
             "Dense_1": {"kernel": base["fc2.weight"].T, "bias": base["fc2.bias"]}}
    adapter, params = sora_jax.load_peft_adapter(tmp_path / "a", linen, key_map={"fc1": "Dense_0", "fc2": "Dense_1"})
    p = sora_jax.apply_adapter(params, adapter)
    y = np.tanh(x @ np.asarray(p["Dense_0"]["kernel"]) + np.asarray(p["Dense_0"]["bias"]))
    y = y @ np.asarray(p["Dense_1"]["kernel"]) + np.asarray(p["Dense_1"]["bias"])
    assert _err(y, ref) < TOL

    # the PyTorch state dict itself (default key map: dots are path separators); load the result into torch
    adapter, params = sora_jax.load_peft_adapter(tmp_path / "a", base)
    merged = sora_jax.merge(params, adapter)
    plain = _TorchMLP()
    plain.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in merged.items()})
    with torch.no_grad():
        assert _err(plain(torch.tensor(x)).numpy(), ref) < TOL

    with pytest.raises(AdapterError, match=r"'base_model.model.fc1.lora_A.weight': PEFT module 'fc1' maps to 'fc1', "
                                           r"which is no module in params(.|\n)*key_map="):
        sora_jax.load_peft_adapter(tmp_path / "a", linen)


# -- the authors' SORA checkpoints -------------------------------------------------------------------
class TorchSora(torch.nn.Module):
    """docs/spec.md section 2's SORA layer in PyTorch, with the authors' parameter names and layouts:
    ``y = (d * (x W^T + b) + s (x A^T) B^T) R``, ``z R = z + s_p ((z C) D^T - (z D) C^T)``,
    ``s_p = min(1, initial_s_p / (||C||_F + ||D||_F + 1e-6))``; ``lora_A (r, d_in)``, ``lora_B (d_out, r)``,
    ``lora_C``/``lora_D (d_out, r_p)``, ``lora_Diag (d_out, 1)``."""

    def __init__(self, base: torch.nn.Linear, r: int, lora_alpha: float, r_p: int, initial_s_p: float = 1.0):
        super().__init__()
        self.base = base
        d_in, d_out = base.in_features, base.out_features
        self.lora_A = torch.nn.Linear(d_in, r, bias=False)
        self.lora_B = torch.nn.Linear(r, d_out, bias=False)
        self.lora_C = torch.nn.Linear(r_p, d_out, bias=False)
        self.lora_D = torch.nn.Linear(r_p, d_out, bias=False)
        self.lora_Diag = torch.nn.Linear(1, d_out, bias=False)
        self.s, self.initial_s_p = lora_alpha / r, initial_s_p
        with torch.no_grad():  # a "trained" state: B != 0, C != D, d != 1
            self.lora_B.weight.normal_(0, 0.2)
            self.lora_C.weight.normal_(0, 0.3)
            self.lora_D.weight.normal_(0, 0.3)
            self.lora_Diag.weight.copy_(1 + 0.2 * torch.randn(d_out, 1))

    def forward(self, x):
        z = self.lora_Diag.weight[:, 0] * self.base(x) + self.s * self.lora_B(self.lora_A(x))
        C, D = self.lora_C.weight, self.lora_D.weight
        sp = torch.clamp(self.initial_s_p / (C.norm() + D.norm() + 1e-6), max=1.0)
        return z + sp * ((z @ C) @ D.T - (z @ D) @ C.T)


def _sora_checkpoint(bert_dir, out, targets, r, alpha, r_p, initial_s_p, config=True, fmt="safetensors"):
    torch.manual_seed(2)
    tm = torch_model("bert", initializer_range=INIT)
    state = {}
    for name, mod in list(tm.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and isinstance(mod, torch.nn.Linear):
            parent = tm.get_submodule(name.rsplit(".", 1)[0])
            layer = TorchSora(mod, r, alpha, r_p, initial_s_p)
            setattr(parent, name.rsplit(".", 1)[1], layer)
            for k in ("lora_A", "lora_B", "lora_C", "lora_D", "lora_Diag"):
                state[f"base_model.model.{name}.{k}.weight"] = getattr(layer, k).weight.detach().clone().contiguous()
    out.mkdir(parents=True)
    if fmt == "safetensors":
        save_file(state, str(out / "adapter_model.safetensors"))
    else:
        torch.save(state, out / "adapter_model.bin")
    if config:
        (out / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "SORA", "r": r, "lora_alpha": alpha, "r_p": r_p, "initial_s_p": initial_s_p,
             "target_modules": list(targets), "lora_dropout": 0.0}))
    return tm.eval()


@pytest.mark.parametrize("config", [True, False], ids=["with_config", "bare_state_dict"])
def test_authors_sora_checkpoint_outputs_equal(config, bert_dir, tmp_path):
    targets = ("query", "value", "dense")
    tm = _sora_checkpoint(bert_dir, tmp_path / "s", targets, r=4, alpha=8, r_p=2, initial_s_p=0.5, config=config,
                          fmt="safetensors" if config else "bin")
    model = load_pretrained(bert_dir)
    b = batch(model.config)
    with torch.no_grad():
        ref = torch_forward(tm, b).logits
    if not config:
        with pytest.raises(AdapterError, match="no adapter_config.json.*lora_alpha="):
            sora_jax.load_peft_adapter(tmp_path / "s", model)
    kw = {} if config else {"lora_alpha": 8, "initial_s_p": 0.5}
    adapter, params = sora_jax.load_peft_adapter(tmp_path / "s", model, **kw)
    assert adapter.config.method == "sora" and adapter.config.rotation_rank == 2
    assert adapter.config.initial_s_p == 0.5 and adapter.config.scaling_for("x") == 2.0
    got = model.apply(sora_jax.apply_adapter(params, adapter), **b)["logits"]
    act = model.apply(params, dense_fn=sora_jax.adapted_dense(adapter), **b)["logits"]
    print(f"sora: weight path {_err(got, ref):.2e}, activation path {_err(act, ref):.2e}")
    assert _err(got, ref) < TOL, _err(got, ref)
    assert _err(act, ref) < TOL, _err(act, ref)
    assert _err(model.apply(params, **b)["logits"], ref) > 1e-2


# -- errors ------------------------------------------------------------------------------------------
def test_errors_name_key_shape_and_fix(bert_dir, tmp_path):
    model = load_pretrained(bert_dir)
    pm = _peft_model(bert_dir, **CASES["lora"])
    pm.save_pretrained(str(tmp_path / "a"))
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    # a rank the weights do not have
    cfg_file.write_text(json.dumps({**cfg, "rank_pattern": {}}))
    with pytest.raises(AdapterError, match=r"value'?: lora_A.weight has shape \(2, 32\) \(rank 2\) but adapter_config.json gives r=4"):
        sora_jax.load_peft_adapter(tmp_path / "a", model)
    # options that change the factors' meaning
    cfg_file.write_text(json.dumps({**cfg, "lora_bias": True}))
    with pytest.raises(AdapterError, match=r"lora_bias=True is a PEFT option sora_jax does not read.*merge the adapter"):
        sora_jax.load_peft_adapter(tmp_path / "a", model)
    cfg_file.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match=r"peft_type 'IA3'"):
        sora_jax.load_peft_adapter(tmp_path / "a", model)
    # an adapter for another model: wider layers
    cfg_file.write_text(json.dumps(cfg))
    small = save(torch_model("bert", hidden_size=16, intermediate_size=20), tmp_path / "small")
    with pytest.raises(AdapterError, match=r"query'\.A: shape \(4, 32\), but module 'bert/encoder/layer_0/attention/self/query' "
                                           r"\(kernel \(16, 16\), d_in=16, d_out=16\) needs \(4, 16\)"):
        sora_jax.load_peft_adapter(tmp_path / "a", load_pretrained(small))
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        sora_jax.load_peft_adapter(tmp_path / "nowhere", model)
