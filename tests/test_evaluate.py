"""Evaluation: rows and gold answers in standard schemas, and a real Ray Data run on a tiny model
(answer extraction itself: tests/test_answers.py; with the real SmolLM2: tests/test_real_model.py)."""
from __future__ import annotations

import json
import math

import pytest

from s2l_ray import evaluate
from s2l_ray.answers import answers_match
from s2l_ray.config import CorpusConfig, EvaluateConfig, TextConfig


def test_load_rows_gold_answers_and_errors(tmp_path):
    good = tmp_path / "eval.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "p1", "response": "r\n#### 5", "source": "a"},
        {"prompt": "p2", "response": "worked it out", "answer": 7},
        {"prompt": "p3", "response": "#### 9", "source": "a"}]) + "\n")
    rows = evaluate.load_rows(str(good), EvaluateConfig(limit=2))
    assert [(r["gold"], r["source"]) for r in rows] == [("5", "a"), ("7", "default")]
    bad = tmp_path / "bad.jsonl"
    long = "We reason about it at length, step after step, and never write down a final value at all here."
    bad.write_text(json.dumps({"prompt": "p", "response": long}) + "\n")
    with pytest.raises(evaluate.EvaluateError, match=r"bad.jsonl:1: no gold answer"):
        evaluate.load_rows(str(bad), EvaluateConfig())
    bad.write_text(json.dumps({"prompt": "p", "response": "#### 1"}) + "\n" + json.dumps({"q": "q"}) + "\n")
    with pytest.raises(evaluate.EvaluateError, match=r"bad.jsonl:2: missing field 'prompt'"):
        evaluate.load_rows(str(bad), EvaluateConfig())


def test_gold_answers_of_gsm8k_math_and_short_answer_files(tmp_path):
    """GSM8K's own schema (its answer column is a rationale ending in #### N), MATH's (boxed), short golds."""
    rows = [{"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?",
             "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                       "altogether in April and May.\n#### 72"}]
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = evaluate.load_rows(str(tmp_path / "gsm8k.jsonl"), EvaluateConfig())
    assert got[0]["gold"] == "72" and got[0]["prompt"] == rows[0]["question"]
    math_rows = [{"problem": "What is $1/2 + 1/4$?", "solution": "We add: $\\boxed{\\frac{3}{4}}$."}]
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math_rows))
    assert evaluate.load_rows(str(tmp_path / "math.jsonl"), EvaluateConfig())[0]["gold"] == "\\frac{3}{4}"
    short = [{"prompt": "Is 7 prime?", "response": "True"}, {"prompt": "Sort 5, -3, 1.", "response": "-3, 1, 5"}]
    (tmp_path / "short.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    assert [r["gold"] for r in evaluate.load_rows(str(tmp_path / "short.jsonl"), EvaluateConfig())] == \
        ["True", "-3, 1, 5"]


def test_resolve_paths(tmp_path):
    run = tmp_path / "target"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    assert evaluate.resolve_paths(EvaluateConfig(model=str(run))) == (str(run / "model"), str(run / "eval"))
    assert evaluate.resolve_paths(EvaluateConfig(model=str(run / "model"), output="x")) == (str(run / "model"), "x")
    with pytest.raises(evaluate.EvaluateError, match="run jobs/finetune.py first"):
        evaluate.resolve_paths(EvaluateConfig(model=str(tmp_path / "none")))


def test_evaluate_run_on_a_tiny_model(ray_local, demo_small, tmp_path):
    from s2l_ray.models import build_model, load_tokenizer, save_model
    from s2l_ray.scoring import reference_losses

    tok = load_tokenizer(demo_small["tokenizer"])
    model = build_model("tiny", tok, seed=1, max_length=256)
    model_dir = save_model(model, tok, str(tmp_path / "model"))
    cfg = EvaluateConfig(model=model_dir, output=str(tmp_path / "eval"), max_new_tokens=6, limit=12, batch_size=4,
                         corpus=CorpusConfig(path=demo_small["eval"]), text=TextConfig(max_length=256))
    metrics = evaluate.run(cfg)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["overall"] == metrics["overall"] and metrics["rows"] == 12
    assert sum(s["n"] for s in metrics["sources"].values()) == 12
    preds = [json.loads(line) for line in open(tmp_path / "eval" / "predictions.jsonl")]
    assert [p["correct"] for p in preds] == [answers_match(p["prediction"], p["gold"]) for p in preds]
    assert metrics["overall"]["correct"] == sum(p["correct"] for p in preds)
    from s2l_ray.corpus import normalise

    rows = [normalise(json.loads(line), CorpusConfig()) for line in open(demo_small["eval"])][:12]
    ref = reference_losses(model.eval(), tok, rows[:3], cfg.text)
    assert all(math.isclose(p["loss"], r, rel_tol=1e-4) for p, r in zip(preds, ref))
    assert metrics["overall"]["loss"] == pytest.approx(sum(p["loss"] for p in preds) / 12, rel=1e-6)
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| **overall** | 12 |" in table and all(f"| {s} |" in table for s in metrics["sources"])
