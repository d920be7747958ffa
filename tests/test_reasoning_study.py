"""experiments/reasoning_study.py: the plan, the trivial rows from the evaluated subsets, the ranked-choice
zero-shot scorer against lm_eval's HFLM over transformers' torch model, and the report from kept results
alone (fabricated results and data in a temporary folder)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import transformers
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from test_reasoning import tiny_model_dir

from experiments import reasoning_study as rs
from sora_jax import lm

ROWS = {  # three examples per task, in LLM-Adapters' format
    "boolq": [
        {"instruction": f"Is {n} even?\n\nAnswer format: true/false", "input": "", "answer": a,
         "output": f"the correct answer is {a}"}
        for n, a in ((4, "true"), (7, "false"), (10, "true"))
    ],
    "ARC-Easy": [
        {"instruction": f"Pick {k}.\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3",
         "input": "", "answer": f"answer{k}", "output": f"the correct answer is answer{k}"}
        for k in (1, 1, 3)
    ],
}  # fmt: skip


@pytest.fixture()
def study(tmp_path: Path, monkeypatch):
    data = tmp_path / "data"
    for task, rows in ROWS.items():
        (data / "commonsense" / task).mkdir(parents=True)
        (data / "commonsense" / task / "test.json").write_text(json.dumps(rows))
    suite = dataclasses.replace(rs.SUITES["commonsense"], tasks=tuple(ROWS), eval_samples=3)
    monkeypatch.setitem(rs.SUITES, "commonsense", suite)
    monkeypatch.setattr(rs, "DATA", data)
    monkeypatch.setattr(rs, "HERE", tmp_path / "study")
    monkeypatch.setattr(rs, "RESULTS", tmp_path / "study" / "results")
    return rs


def test_plan_order_and_argv(study):
    ids = [r.id for r in study.plan()]
    assert ids[:2] == ["commonsense-zero_shot-smollm2-s0", "commonsense-zero_shot_rank-smollm2-s0"]
    assert ids.index("math-lora-gemma3-270m-s0") < ids.index("math-dora-gemma3-270m-s0")
    lora = study.Run("commonsense", "lora")
    argv = lora.argv(Path("out"))
    assert lora.script == "reasoning.py" and argv[argv.index("--method") + 1] == "lora"
    assert argv[argv.index("--max-eval-samples") + 1] == "3" and "--scan-layers" in argv
    zero = study.Run("commonsense", "zero_shot")
    assert "--zero-shot" in zero.argv(Path("out")) and "--method" not in zero.argv(Path("out"))
    assert study.Run("commonsense", "zero_shot_rank").script == "reasoning_study.py"


def test_trivial_rows_from_the_evaluated_subset(study):
    assert study.choices(ROWS["ARC-Easy"][0]) == ["answer1", "answer2", "answer3"]
    assert study.choices({"instruction": "no format line"}) == []
    triv = study.trivial("commonsense")
    assert triv["boolq"] == (50.0, pytest.approx(200 / 3))  # 2 of 3 answers are "true"
    assert triv["ARC-Easy"] == (pytest.approx(100 / 3), pytest.approx(200 / 3))


def test_rank_picks_the_answer_hflm_scores_highest(study, tmp_path):
    """Every pick equals the arg-max of lm_eval's HFLM log-likelihoods over transformers' torch model on
    the same weights (an independent implementation), and the accuracy counts them."""
    path = tiny_model_dir(tmp_path / "model")
    study.SUITES["commonsense"] = dataclasses.replace(study.SUITES["commonsense"], model=str(path))  # restored
    study.rank("commonsense", tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["finished"] and set(res["accuracy"]) == set(ROWS)

    ref = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    hflm = HFLM(pretrained=ref, tokenizer=transformers.AutoTokenizer.from_pretrained(path), batch_size=4)
    for task, rows in ROWS.items():
        picks = json.loads((tmp_path / "run" / "predictions" / f"{task}.json").read_text())
        want = []
        for r in rows:
            opts = study.choices(r)
            reqs = [Instance("loglikelihood", {}, (lm.prompt(r), f"the correct answer is {c}"), i) for i, c in
                    enumerate(opts)]  # fmt: skip
            lls = [ll for ll, _ in hflm.loglikelihood(reqs, disable_tqdm=True)]
            want.append(opts[lls.index(max(lls))])
        assert [p["picked"] for p in picks] == want
        correct = sum(w == r["answer"] for w, r in zip(want, rows, strict=True))
        assert res["scores"][task] == {"accuracy": correct / 3, "n": 3, "correct": correct}


def test_report_from_kept_results(study):
    out = study.RESULTS / "commonsense-lora-smollm2-s0"
    out.mkdir(parents=True)
    res = {
        "finished": True,
        "accuracy": {"boolq": 2 / 3, "ARC-Easy": 1 / 3},
        "average": 0.5,
        "parameters": {"percent": 2.6},
        "timing": {"train_wall_s": 600.0, "eval_s": 120.0},
    }
    (out / "results.json").write_text(json.dumps(res))
    (study.RESULTS / "commonsense-dora-smollm2-s0").mkdir()
    (study.RESULTS / "commonsense-dora-smollm2-s0" / "results.json").write_text(json.dumps({**res, "finished": False}))
    text = study.report()
    assert "| LoRA | 2.60 | 66.7 | 33.3 | 50.0 | 10.0 | 2.0 |" in text
    assert "| DoRA | – |" in text  # an unfinished run is not reported
    (out / "results.json").write_text(json.dumps({**res, "resumed_from_step": 30}))
    assert "| 50.0 | 10.0 (from step 30) | 2.0 |" in study.report()  # the time of the resumed part only
    assert "| *majority answer* | – | 66.7 | 66.7 | 66.7 | – | – |" in text
    assert study.main(["report"]) == 0 and "| LoRA | 2.60 |" in (study.HERE / "README.md").read_text()


def test_run_method_filter_keeps_the_given_order(study, monkeypatch):
    seen = []
    monkeypatch.setattr(study.reproduce, "train", lambda runs, *a, **k: seen.extend(r.id for r in runs))
    assert study.main(["run", "--method", "sora", "--method", "lora"]) == 0
    assert seen == [
        "commonsense-sora-smollm2-s0",
        "math-sora-gemma3-270m-s0",
        "commonsense-lora-smollm2-s0",
        "math-lora-gemma3-270m-s0",
    ]


def test_sign_test_against_scipy():
    from scipy.stats import binomtest

    for wins, losses in ((6, 2), (41, 35), (19, 11), (0, 7), (5, 5), (30, 10)):
        want = binomtest(wins, wins + losses, 0.5).pvalue
        assert abs(rs.sign_test_p(wins, losses) - want) < 1e-12, (wins, losses)
    assert rs.sign_test_p(0, 0) == 1.0


def test_paired_table_from_kept_responses(study):
    """Wins and losses against LoRA are counted per example from the kept responses and the gold answers."""
    res = {"finished": True, "accuracy": {}, "average": 0.0, "parameters": {"percent": 2.6}, "timing": {}}
    kept = {  # gold: boolq true/false/true, ARC-Easy answer1/answer1/answer3
        "lora": {"boolq": ["true", "true", "true"], "ARC-Easy": ["answer1", "answer2", "answer2"]},
        "sora": {"boolq": ["true", "false", "false"], "ARC-Easy": ["answer1", "answer1", "answer3"]},
    }
    for m, by_task in kept.items():
        out = study.RESULTS / f"commonsense-{m}-smollm2-s0"
        (out / "predictions").mkdir(parents=True)
        (out / "results.json").write_text(json.dumps(res))
        for task, answers in by_task.items():
            responses = [f"the correct answer is {a}" for a in answers]
            (out / "predictions" / f"{task}.json").write_text(json.dumps({"fingerprint": "x", "responses": responses}))
    # SORA right where LoRA is wrong: boolq #2, ARC #2, ARC #3; LoRA right where SORA is wrong: boolq #3
    p = rs.sign_test_p(3, 1)
    assert f"| SORA | 6 | 3 | 1 | +33.3 | {p:.2f} |" in study.paired_table("commonsense")
    assert "Paired on the same examples" in study.report()
