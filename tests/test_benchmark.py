"""jobs/benchmark.py's library end to end on a tiny configuration: selection run, cells, tables, reuse."""
from __future__ import annotations

import json
import re

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


METHODS = ("s2l", "s2l-global", "random", "s2l-target", "random-target-sources", "embedding-target",
           "s2l@proportional")


def test_benchmark_runs_end_to_end_and_reuses_cells(ray_local, tmp_path, monkeypatch):
    """One target-aware benchmark over every kind of method (per-source and global k-means, target examples from
    the demo's far seeds, split variants, a baseline on embeddings, random), the base model, the held-out set and
    the one-task target evaluation, each compared against random; tracked in MLflow; every cell reused after."""
    from collections import Counter

    from mlflow.tracking import MlflowClient

    from s2l_ray.models import build_model, load_tokenizer, save_model
    from s2l_ray.tracking import metric_name

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file://{tmp_path}/mlruns"
    cfg = tiny(tmp_path, methods=",".join(METHODS), base="true", demo_target="target", **{
        "tracking.backend": "mlflow", "tracking.uri": store, "selection.demo.target_sources": "gcd",
        "selection.demo.target_per_source": 6, "selection.demo.target_eval_per_source": 5,
        "selection.cluster.per_source": "true"})
    tok = load_tokenizer(benchmark.prepare(cfg).selection.text.tokenizer)  # the demo's, built by prepare
    cfg.finetune.model = save_model(build_model("tiny", tok, max_length=96), tok, str(tmp_path / "target"))
    results = benchmark.run(cfg)
    n = results["rows"]
    assert n == 32 and results["budgets"] == [8]
    cells = {(c["method"], c["budget"], c["seed"]) for c in results["cells"]}
    assert cells == {(m, 8, s) for m in METHODS for s in (0, 1)} | {("base", 0, 0)}
    # S2L without sources: one k-means over all rows (K per source x sources); its purity is reported
    assert results["global_clusters"]["k"] == 6 and not results["global_clusters"]["per_source"]
    assert 0.5 <= results["global_clusters"]["source_purity"] <= 1.0
    # paired comparisons against random, from the cells' own per-item predictions, on both evaluation sets
    comp = {(r["method"], r["eval"], r["metric"]): r for r in results["comparisons"] if r["baseline"] == "random"}
    assert set(comp) == {(m, e, k) for m in METHODS if m != "random" for e in ("eval", "target")
                         for k in ("accuracy", "loss")}
    by_seed = {(c["method"], c["seed"]): c for c in results["cells"]}
    assert comp[("s2l", "eval", "loss")]["per_seed"] == pytest.approx(
        [by_seed[("s2l", s)]["loss"] - by_seed[("random", s)]["loss"] for s in (0, 1)], abs=1e-6)
    assert comp[("s2l", "eval", "loss")]["low"] <= comp[("s2l", "eval", "loss")]["mean"] <= \
        comp[("s2l", "eval", "loss")]["high"]
    # the cost ledger: the selection's stages and each method's fine-tuning, in core-seconds on this CPU
    cost = results["cost"]
    assert cost["unit"] == "core-seconds" and cost["selection"]["proxy training"] > 0
    assert cost["selection"]["scoring"] > 0 and cost["selection"]["embeddings"] > 0
    assert set(cost["finetune_mean"]) == {f"{m} 8" for m in METHODS}
    # the benchmark's tracked run (MLflow's file store): the ledger, each method's mean, the comparisons, the files
    client = MlflowClient(store)
    (tracked,) = client.search_runs([client.get_experiment_by_name("s2l-ray").experiment_id])
    metrics = tracked.data.metrics
    assert {k: metrics[metric_name(f"cost/selection/{k}/core_seconds")] for k in cost["selection"]} == cost["selection"]
    assert metrics["cost/finetune_mean/random 8/core_seconds"] == cost["finetune_mean"]["random 8"]
    mean = next(r for r in results["summary"] if r["method"] == "s2l")["evals"]["eval"]["accuracy"]
    assert metrics["benchmark/eval/s2l/8/accuracy"] == mean
    for (method, name, metric), c in comp.items():  # against random, and against random-target-sources
        assert metrics[metric_name(f"comparison/{name}/{method}/8/vs random/{metric}/mean")] == c["mean"]
    controls = [r for r in results["comparisons"] if r["baseline"] == "random-target-sources"]
    assert controls and all(metrics[metric_name(f"comparison/{r['eval']}/{r['method']}/8/vs random-target-sources/"
                                                f"{r['metric']}/high")] == r["high"] for r in controls)
    assert {a.path for a in client.list_artifacts(tracked.info.run_id, "benchmark")} == {
        "benchmark/results.json", "benchmark/results.md", "benchmark/results.html", "benchmark/results.png"}
    # every cell's evaluations are its own metrics files: the held-out set and the target task
    targets, data = tmp_path / "bench" / "targets", tmp_path / "bench" / "data"
    for c in results["cells"]:
        folder = "base" if c["method"] == "base" else f"{c['method']}-{c['budget']}/seed{c['seed']}"
        assert list(c["evals"]) == ["eval", "target"] and c["examples"] == c["budget"]
        for name, rows in (("eval", 6), ("target", 5)):
            e, m = c["evals"][name], json.loads((targets / folder / f"eval{'' if name == 'eval' else '-target'}"
                                                 / "metrics.json").read_text())
            assert m["overall"]["accuracy"] == e["accuracy"] and m["rows"] == rows and e["loss"] > 0
        assert c["evals"]["eval"]["accuracy"] == c["accuracy"] and set(c["evals"]["eval"]["sources"]) == {
            "gcd", "basic_arithmetic"}
        assert c["evals"]["eval"]["source_loss"] == {s: m["loss"] for s, m in json.loads(
            (targets / folder / "eval" / "metrics.json").read_text())["sources"].items()}
    rows = {(r["method"], r["budget"]): r for r in results["summary"]}
    assert rows[("s2l", 8)]["seeds"] == 2
    assert rows[("s2l", 8)]["evals"]["eval"]["loss"] == pytest.approx((by_seed[("s2l", 0)]["loss"]
                                                                       + by_seed[("s2l", 1)]["loss"]) / 2)
    # the target examples, and the one-task held-out set drawn apart from them
    assert results["target"] == {"gcd": 6}
    held_out = [json.loads(line) for line in open(data / "eval_target.jsonl")]
    target = [json.loads(line) for line in open(data / "target.jsonl")]
    assert len(held_out) == 5 and {r["source"] for r in held_out} == {"gcd"}
    assert not {r["prompt"] for r in target} & {r["prompt"] for r in held_out}  # the target set is not evaluated
    sel = tmp_path / "bench" / "selections"
    assert (sel / "s2l" / "seed0" / "selected.jsonl").read_text() != (sel / "s2l" / "seed1" / "selected.jsonl").read_text()
    # where the budget goes: each method's mix of sources is that of its subsets' files, mean over seeds
    drawn = {(r["method"], r["budget"]): r["sources"] for r in results["composition"]}
    for method in METHODS:
        files = [Counter(json.loads(line)["source"] for line in open(sel / method / f"seed{s}" / "selected.jsonl"))
                 for s in (0, 1)]
        assert drawn[(method, 8)] == {k: (files[0][k] + files[1][k]) / 2 for k in ("gcd", "basic_arithmetic")}
    # every target example is gcd (s = 0.1 over 2 sources: weights .95 and .05): floor(8 * .95) = 7 and 1
    assert drawn[("random-target-sources", 8)] == {"basic_arithmetic": 1.0, "gcd": 7.0}
    assert drawn[("s2l@proportional", 8)] == {"basic_arithmetic": 4.0, "gcd": 4.0}  # 16 rows each: 4 and 4
    md = (tmp_path / "bench" / "results.md").read_text()
    mix = drawn[("s2l", 8)]
    assert "Where the budget goes" in md and f"| s2l | 25% | {mix['basic_arithmetic']:.0f} | {mix['gcd']:.0f} |" in md
    assert "| s2l | 25% | 8 |" in md and "fine-tune, per cell" in md and "Response loss per source" in md
    assert "| s2l | 25% | random |" in md and "selection, total" in md and "source purity" in md
    assert "| base | - | 0 |" in md and "on the target task" in md and "exact match, the target task" in md
    assert (tmp_path / "bench" / "results.png").read_bytes()[:4] == b"\x89PNG"
    page = open_page(tmp_path / "bench" / "results.html")  # the same results as a page, in a real browser
    assert page["errors"] == [] and page["figures"] == page["drawn"] == 4  # exact match and loss, per evaluation
    summary = page["tables"][0]
    assert sorted(r[0] for r in summary) == sorted([*METHODS, "base"])
    for r in summary:
        row = next(x for x in results["summary"] if x["method"] == r[0])
        assert float(r[3]) == pytest.approx(100 * row["evals"]["eval"]["accuracy"], abs=5e-4)
        assert float(r[5]) == pytest.approx(row["evals"]["eval"]["loss"], abs=5e-4)
    again = benchmark.run(cfg)  # every stage and cell reused: identical cells
    assert again["cells"] == results["cells"]
    assert json.loads((targets / "s2l-8" / "seed0" / "finetune.json").read_text())["sweep_runs"] == 14  # one group
    changed = tiny(tmp_path, methods=",".join(METHODS), base="true", demo_target="target", **{
        "selection.demo.target_sources": "gcd", "selection.demo.target_per_source": 6,
        "selection.demo.target_eval_per_source": 5, "selection.cluster.per_source": "true"})
    changed.finetune.model, changed.finetune.epochs = cfg.finetune.model, 2
    with pytest.raises(ConfigError, match="fine-tuned or evaluated with another finetune/evaluate config"):
        benchmark.run(changed)  # stale cells are refused, not silently reused


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
