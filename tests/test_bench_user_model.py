"""experiments/bench_user_model.py runs (tiny shapes) and reports both paths of both frameworks."""

from __future__ import annotations

import json


def test_bench_user_model_quick(tmp_path):
    from experiments import bench_user_model as mod

    out = tmp_path / "b.json"
    mod.main(["--quick", "--methods", "lora", "--out", str(out)])
    report = json.loads(out.read_text())
    res = report["results"]
    for fw in ("linen", "nnx"):
        assert res[f"{fw}/frozen"]["n"] == 2
        for path in ("weight", "activation"):
            st = res[f"{fw}/lora/{path}"]
            assert st["n"] == 2 and 0 < st["p10_s"] <= st["median_s"] <= st["p90_s"]
        assert res[f"{fw}/lora/activation"]["weight/activation"] > 0
