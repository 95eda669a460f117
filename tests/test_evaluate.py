"""Evaluation: the answer extraction and exact-match table, and a real Ray Data run on a tiny model."""
from __future__ import annotations

import json
import math

import pytest

from s2l_ray import evaluate
from s2l_ray.config import CorpusConfig, EvaluateConfig, TextConfig
from s2l_ray.evaluate import answers_match, extract_answer


@pytest.mark.parametrize("text, answer", [
    ("Step 1: 3 + 4 = 7\n#### 7", "7"),
    ("#### 12 ####\n 1,000\nmore text", "1,000"),
    ("#### \n42", "42"),
    ("The total is $12.50.", "$12.50"),
    ("so we lose -3 apples", "-3"),
    ("between 1/2 and 3 / 4 cups", "3 / 4"),
    ("listing 1, 2, 3", "3"),
    ("no number at all", ""),
    ("#### 17 × 37", "17 × 37"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("prediction, gold, match", [
    ("12.50", "12.5", True),
    ("1,000", "1000", True),
    ("1,000,000.0", "1000000", True),
    ("3/4", "0.75", True),
    ("$\\frac{3}{4}$", "3/4", True),
    ("\\dfrac{635}{806}", "$635/806$", True),
    ("-5", "-5.0", True),
    ("−5", "-5", True),
    ("+7", "7", True),
    ("$12", "12", True),
    ("50%", "50", True),
    ("78.", "78", True),
    (".5", "1/2", True),
    ("0.333", "1/3", False),
    ("5", "-5", False),
    ("12", "13", False),
    ("1,2", "12", False),
    ("1/0", "0", False),
    ("17 x 37", "17 × 37", True),
    ("2*2*3", "2 × 2 × 3", True),
    ("1A3", "1a3", True),
    ("Yes", "yes.", True),
    ("", "0", False),
    ("", "", False),
])
def test_answers_match(prediction, gold, match):
    assert answers_match(prediction, gold) is match


def test_load_rows_gold_answers_and_errors(tmp_path):
    good = tmp_path / "eval.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "p1", "response": "r\n#### 5", "source": "a"},
        {"prompt": "p2", "response": "worked it out", "answer": 7},
        {"prompt": "p3", "response": "#### 9", "source": "a"}]) + "\n")
    rows = evaluate.load_rows(str(good), EvaluateConfig(limit=2))
    assert [(r["gold"], r["source"]) for r in rows] == [("5", "a"), ("7", "default")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(evaluate.EvaluateError, match=r"bad.jsonl:1: no gold answer"):
        evaluate.load_rows(str(bad), EvaluateConfig())
    bad.write_text(json.dumps({"question": "q", "response": "#### 1"}) + "\n")
    with pytest.raises(evaluate.EvaluateError, match=r"bad.jsonl:1: field 'prompt'"):
        evaluate.load_rows(str(bad), EvaluateConfig())


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
    rows = [json.loads(line) for line in open(demo_small["eval"])][:12]
    ref = reference_losses(model.eval(), rows[:3], tok, cfg.text.template, 256)
    assert all(math.isclose(p["loss"], r, rel_tol=1e-4) for p, r in zip(preds, ref))
    assert metrics["overall"]["loss"] == pytest.approx(sum(p["loss"] for p in preds) / 12, rel=1e-6)
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| **overall** | 12 |" in table and all(f"| {s} |" in table for s in metrics["sources"])
