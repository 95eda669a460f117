"""jobs/benchmark.py's library end to end on a tiny configuration: selection run, cells, tables, reuse."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from helpers import open_page
from s2l_ray import benchmark
from s2l_ray.config import BenchmarkConfig, ConfigError, load_config


def tiny(tmp_path, **extra) -> BenchmarkConfig:
    return load_config(None, {
        "output": str(tmp_path / "bench"), "methods": "s2l", "budgets": "0.25", "seeds": "0,1",
        "full": "false",
        "selection.demo.sources": "gcd,basic_arithmetic", "selection.demo.train_per_source": 16,
        "selection.demo.eval_per_source": 3, "selection.demo.vocab_size": 300,
        "selection.text.max_length": 96, "selection.proxy.epochs": 1, "selection.proxy.batch_size": 4,
        "selection.proxy.num_points": 2, "selection.proxy.workers.count": 1, "selection.proxy.workers.cpus": 0.5,
        "selection.cluster.k": 3,
        "finetune.preset": "tiny", "finetune.epochs": 1, "finetune.lr": 0.001, "finetune.micro_batch_size": 4,
        "finetune.checkpoint_every": 0, "finetune.workers.count": 1, "finetune.workers.cpus": 0.5,
        "finetune.text.max_length": 96,
        "evaluate.max_new_tokens": 4, "evaluate.actors.count": 1, "evaluate.text.max_length": 96, **extra,
    }, cls=BenchmarkConfig)


def test_benchmark_runs_end_to_end_and_reuses_cells(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file://{tmp_path}/mlruns"
    cfg = tiny(tmp_path, methods="s2l,s2l-global,random", **{"tracking.backend": "mlflow", "tracking.uri": store})
    results = benchmark.run(cfg)
    n = results["rows"]
    assert n == 32 and results["budgets"] == [8]
    cells = {(c["method"], c["budget"], c["seed"]) for c in results["cells"]}
    assert cells == {(m, 8, s) for m in ("s2l", "s2l-global", "random") for s in (0, 1)}
    # S2L without sources: one k-means over all rows; its purity is reported
    assert results["global_clusters"]["k"] == 6 and not results["global_clusters"]["per_source"]
    assert 0.5 <= results["global_clusters"]["source_purity"] <= 1.0
    # paired comparisons against random, from the cells' own per-item predictions
    comp = {(r["method"], r["metric"]): r for r in results["comparisons"]}
    assert set(comp) == {(m, k) for m in ("s2l", "s2l-global") for k in ("accuracy", "loss")}
    assert {r["eval"] for r in results["comparisons"]} == {"eval"}
    s2l_loss = [c["loss"] for c in sorted(results["cells"], key=lambda c: c["seed"]) if c["method"] == "s2l"]
    random_loss = [c["loss"] for c in sorted(results["cells"], key=lambda c: c["seed"]) if c["method"] == "random"]
    assert comp[("s2l", "loss")]["per_seed"] == pytest.approx([a - b for a, b in zip(s2l_loss, random_loss)], abs=1e-6)
    assert comp[("s2l", "loss")]["low"] <= comp[("s2l", "loss")]["mean"] <= comp[("s2l", "loss")]["high"]
    # the cost ledger: the selection's stages and each method's fine-tuning, in core-seconds on this CPU
    cost = results["cost"]
    assert cost["unit"] == "core-seconds" and cost["selection"]["proxy training"] > 0
    assert cost["selection"]["scoring"] > 0 and set(cost["finetune_mean"]) == {"s2l 8", "s2l-global 8", "random 8"}
    # the benchmark's tracked run (MLflow's file store): the ledger, each method's mean, the comparisons, the files
    from mlflow.tracking import MlflowClient

    from s2l_ray.tracking import metric_name

    client = MlflowClient(store)
    (tracked,) = client.search_runs([client.get_experiment_by_name("s2l-ray").experiment_id])
    metrics = tracked.data.metrics
    assert {k: metrics[metric_name(f"cost/selection/{k}/core_seconds")] for k in cost["selection"]} == cost["selection"]
    assert metrics["cost/finetune_mean/random 8/core_seconds"] == cost["finetune_mean"]["random 8"]
    mean = next(r for r in results["summary"] if r["method"] == "s2l")["evals"]["eval"]["accuracy"]
    assert metrics["benchmark/eval/s2l/8/accuracy"] == mean
    assert metrics["comparison/eval/s2l/loss/mean"] == comp[("s2l", "loss")]["mean"]
    assert {a.path for a in client.list_artifacts(tracked.info.run_id, "benchmark")} == {
        "benchmark/results.json", "benchmark/results.md", "benchmark/results.html", "benchmark/results.png"}
    results = {**results, "cells": [c for c in results["cells"] if c["method"] == "s2l"]}
    for c in results["cells"]:
        e = c["evals"]["eval"]
        assert c["examples"] == c["budget"] and 0.0 <= e["accuracy"] <= 1.0 and e["loss"] > 0
        assert set(e["sources"]) == {"gcd", "basic_arithmetic"} and list(c["evals"]) == ["eval"]
        metrics = json.loads((tmp_path / "bench" / "targets" / f"{c['method']}-{c['budget']}" / f"seed{c['seed']}"
                              / "eval" / "metrics.json").read_text())
        assert metrics["overall"]["accuracy"] == e["accuracy"] == c["accuracy"] and metrics["rows"] == 6
        assert e["source_loss"] == {s: m["loss"] for s, m in metrics["sources"].items()}
    rows = {(r["method"], r["budget"]): r for r in results["summary"]}
    s2l = [c for c in results["cells"] if c["method"] == "s2l"]
    assert rows[("s2l", 8)]["seeds"] == 2
    assert rows[("s2l", 8)]["evals"]["eval"]["loss"] == pytest.approx(sum(c["loss"] for c in s2l) / 2)
    sel = tmp_path / "bench" / "selections"
    assert (sel / "s2l" / "seed0" / "selected.jsonl").read_text() != (sel / "s2l" / "seed1" / "selected.jsonl").read_text()
    # where the budget goes: each method's mix of sources is that of its subsets' files, mean over seeds
    from collections import Counter

    drawn = {(r["method"], r["budget"]): r["sources"] for r in results["composition"]}
    for method in ("s2l", "s2l-global", "random"):
        files = [Counter(json.loads(line)["source"] for line in open(sel / method / f"seed{s}" / "selected.jsonl"))
                 for s in (0, 1)]
        assert drawn[(method, 8)] == {k: (files[0][k] + files[1][k]) / 2 for k in ("gcd", "basic_arithmetic")}
    md = (tmp_path / "bench" / "results.md").read_text()
    mix = drawn[("s2l", 8)]
    assert "Where the budget goes" in md and f"| s2l | 25% | {mix['basic_arithmetic']:.0f} | {mix['gcd']:.0f} |" in md
    assert "| s2l | 25% | 8 |" in md and "fine-tune, per cell" in md and "Response loss per source" in md
    assert "| s2l | 25% | random |" in md and "selection, total" in md and "source purity" in md
    assert (tmp_path / "bench" / "results.png").read_bytes()[:4] == b"\x89PNG"
    page = open_page(tmp_path / "bench" / "results.html")  # the same results as a page, in a real browser
    assert page["errors"] == [] and page["figures"] == page["drawn"] == 2  # exact match and loss, per method
    summary = page["tables"][0]
    assert sorted(r[0] for r in summary) == ["random", "s2l", "s2l-global"]
    for r in summary:
        row = next(x for x in results["summary"] if x["method"] == r[0])
        assert float(r[3]) == pytest.approx(100 * row["evals"]["eval"]["accuracy"], abs=5e-4)
        assert float(r[5]) == pytest.approx(row["evals"]["eval"]["loss"], abs=5e-4)
    again = benchmark.run(cfg)  # every stage and cell reused: identical cells
    assert [c for c in again["cells"] if c["method"] == "s2l"] == results["cells"]
    # With checkpoints inside runs, each target gets its own worker group; training is the same.
    targets = tmp_path / "bench" / "targets"
    swept = json.loads((targets / "s2l-8" / "seed0" / "finetune.json").read_text())
    shutil.rmtree(targets)
    alone = benchmark.run(tiny(tmp_path, seeds="0", **{"finetune.checkpoint_every": 1}))  # selection reused
    (cell,) = alone["cells"]
    assert cell["seed"] == 0 and cell["examples"] == 8
    assert cell["loss"] == pytest.approx(next(c["loss"] for c in results["cells"] if c["seed"] == 0), abs=1e-5)
    assert swept["sweep_runs"] == 6  # every method's targets in one worker group
    assert "sweep_runs" not in json.loads((targets / "s2l-8" / "seed0" / "finetune.json").read_text())
    changed = tiny(tmp_path)
    changed.finetune.epochs = 2
    with pytest.raises(ConfigError, match="fine-tuned or evaluated with another finetune/evaluate config"):
        benchmark.run(changed)  # stale cells are refused, not silently reused


def test_target_aware_benchmark_with_the_base_model_and_a_one_task_evaluation(ray_local, tmp_path):
    """Target examples (the demo's, from far seeds), split variants, a baseline on embeddings, the base model,
    the held-out set and the one-task target evaluation, each compared against random."""
    from s2l_ray.models import build_model, load_tokenizer, save_model

    cfg = tiny(tmp_path, methods="s2l-target,random-target-sources,embedding-target,s2l@proportional,random",
               seeds="0", base="true", demo_target="target", **{"selection.demo.target_sources": "gcd",
                                                     "selection.demo.target_per_source": 6,
                                                     "selection.demo.target_eval_per_source": 5,
                                                     "selection.cluster.per_source": "true",
                                                     "selection.cluster.k": 2})
    tok = load_tokenizer(benchmark.prepare(cfg).selection.text.tokenizer)  # the demo's, built by prepare
    cfg.finetune.model = save_model(build_model("tiny", tok, max_length=96), tok, str(tmp_path / "target"))
    results = benchmark.run(cfg)
    data = tmp_path / "bench" / "data"
    assert results["target"] == {"gcd": 6}
    held_out = [json.loads(line) for line in open(data / "eval_target.jsonl")]
    target = [json.loads(line) for line in open(data / "target.jsonl")]
    assert len(held_out) == 5 and {r["source"] for r in held_out} == {"gcd"}
    assert not {r["prompt"] for r in target} & {r["prompt"] for r in held_out}  # the target set is not evaluated
    base = next(c for c in results["cells"] if c["method"] == "base")
    assert base["examples"] == 0 and set(base["evals"]) == {"eval", "target"}
    assert (tmp_path / "bench" / "targets" / "base" / "eval-target" / "metrics.json").is_file()
    for c in results["cells"]:
        folder = "base" if c["method"] == "base" else f"{c['method']}-{c['budget']}/seed{c['seed']}"
        metrics = json.loads((tmp_path / "bench" / "targets" / folder / "eval-target" / "metrics.json").read_text())
        assert set(c["evals"]) == {"eval", "target"} and metrics["rows"] == 5
        assert metrics["overall"]["accuracy"] == c["evals"]["target"]["accuracy"]
    comp = {(r["method"], r["eval"], r["metric"]) for r in results["comparisons"] if r["baseline"] == "random"}
    assert comp == {(m, e, k) for m in ("s2l-target", "random-target-sources", "embedding-target", "s2l@proportional")
                    for e in ("eval", "target") for k in ("accuracy", "loss")}
    drawn = {r["method"]: r["sources"] for r in results["composition"]}
    # every target example is gcd (s = 0.1 over 2 sources: weights .95 and .05): floor(8 * .95) = 7 and 1
    assert drawn["random-target-sources"] == {"basic_arithmetic": 1.0, "gcd": 7.0}
    assert drawn["s2l@proportional"] == {"basic_arithmetic": 4.0, "gcd": 4.0}  # 16 rows each: 4 and 4
    md = (tmp_path / "bench" / "results.md").read_text()
    assert "| base | - | 0 |" in md and "on the target task" in md and "exact match, the target task" in md
    assert results["cost"]["selection"]["embeddings"] > 0


def test_benchmark_refuses_unknown_or_full_methods(tmp_path):
    for methods, message in (("s2l,kcenter", "unknown selection method 'kcenter'"), ("full", "use full: true"),
                             ("s2l@even", "source split after @ must be one of"),
                             ("s2l-global@target", "has no source split"),
                             ("s2l-target", "needs target examples"), ("random-per-source@target",
                                                                        "needs target examples")):
        cfg = load_config(None, {"output": str(tmp_path), "methods": methods}, cls=BenchmarkConfig)
        with pytest.raises(ConfigError, match=message):
            benchmark.prepare(cfg)


def test_bases_are_pretrained_once_reused_and_refused_when_their_config_changes(ray_local, tmp_path):
    extra = {"bases.enabled": "true", "bases.sources": "gcd,lcm,chain_sum", "bases.rows_per_source": 12,
             "bases.epochs": 1, "bases.micro_batch_size": 4, "bases.max_length": 96, "bases.target_preset": "small",
             "bases.length_window": 2}
    cfg = benchmark.prepare(tiny(tmp_path, **extra))
    built = benchmark.build_bases(cfg)
    root = tmp_path / "bench" / "bases"
    assert built["proxy"] == str(root / "proxy" / "model") and built["target"] == str(root / "target" / "model")
    assert built["target_to_proxy"] > 5 and all((root / r / "model" / "config.json").is_file() for r in ("proxy", "target"))
    rows = [json.loads(line) for line in open(root / "pretraining.jsonl")]
    held_out = {json.loads(line)["prompt"] for line in open(cfg.evaluate.corpus.path)}
    assert len(rows) <= 36 and not held_out & {r["prompt"] for r in rows}  # no held-out problem is pretrained on
    record = json.loads((root / "target" / "finetune.json").read_text())
    assert record["config"]["text"]["train_on_prompt"] and record["final_step"] == record["plan"]["total_steps"]
    assert record["config"]["length_window"] == 2  # texts of similar length pretrained together
    stamps = {r: (root / r / "finetune.json").stat().st_mtime_ns for r in ("proxy", "target")}
    again = benchmark.build_bases(cfg)  # reused: nothing trained again
    assert again["proxy"] == built["proxy"] and {r: (root / r / "finetune.json").stat().st_mtime_ns
                                                 for r in ("proxy", "target")} == stamps
    # another benchmark output shares them (its own demo folder, the same tokenizer by content): nothing trained
    shared = benchmark.build_bases(benchmark.prepare(tiny(tmp_path, output=str(tmp_path / "other"),
                                                          **{**extra, "bases.output": str(root)})))
    assert shared["target"] == built["target"] and not (tmp_path / "other" / "bases").exists()
    assert {r: (root / r / "finetune.json").stat().st_mtime_ns for r in ("proxy", "target")} == stamps
    with pytest.raises(ConfigError, match="bases pretrained with another bases config"):
        benchmark.build_bases(benchmark.prepare(tiny(tmp_path, **{**extra, "bases.lr": 0.01})))
    harder = {**extra, "selection.demo.generator_args": {"gcd": {"max_value": 50}}}  # other texts, other tokenizer
    with pytest.raises(ConfigError, match="bases pretrained with another bases config, tokenizer or demo generator"):
        benchmark.build_bases(benchmark.prepare(tiny(tmp_path, **harder)))


@pytest.mark.parametrize("preset", ["benchmark_cpu.yaml", "benchmark_cpu_scratch.yaml", "benchmark_real.yaml",
                                    "benchmark_gpu.yaml", "benchmark_target.yaml", "benchmark_target_gpu.yaml"])
def test_every_benchmark_preset_passes_a_dry_run(preset):
    from pathlib import Path

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / preset), cls=BenchmarkConfig)
    plan = benchmark.dry_run(cfg)
    assert re.search(rf"\d+ targets( \+ the base model)? -> {re.escape(cfg.output)}", plan) and "ZeRO-2" in plan
