"""jobs/benchmark.py's library end to end on a tiny configuration: selection run, cells, tables, reuse."""
from __future__ import annotations

import json
import shutil

import pytest

from s2l_ray import benchmark
from s2l_ray.config import BenchmarkConfig, ConfigError, load_config


def tiny(tmp_path, **extra) -> BenchmarkConfig:
    return load_config(None, {
        "output": str(tmp_path / "bench"), "methods": "s2l", "budgets": "0.25", "seeds": "0,1",
        "full": "false",
        "selection.demo.sources": "gcd,basic_arithmetic", "selection.demo.train_per_source": 16,
        "selection.demo.eval_per_source": 3, "selection.demo.vocab_size": 300,
        "selection.text.max_length": 96, "selection.proxy.epochs": 1, "selection.proxy.batch_size": 4,
        "selection.proxy.num_points": 2, "selection.proxy.num_workers": 1, "selection.proxy.cpus_per_worker": 0.5,
        "selection.cluster.k": 3,
        "finetune.preset": "tiny", "finetune.epochs": 1, "finetune.lr": 0.001, "finetune.micro_batch_size": 4,
        "finetune.checkpoint_every": 0, "finetune.num_workers": 1, "finetune.cpus_per_worker": 0.5,
        "finetune.text.max_length": 96,
        "evaluate.max_new_tokens": 4, "evaluate.num_actors": 1, "evaluate.text.max_length": 96, **extra,
    }, cls=BenchmarkConfig)


def test_benchmark_runs_end_to_end_and_reuses_cells(ray_local, tmp_path):
    cfg = tiny(tmp_path)
    results = benchmark.run(cfg)
    n = results["rows"]
    assert n == 32 and results["budgets"] == [8]
    cells = {(c["method"], c["budget"], c["seed"]) for c in results["cells"]}
    assert cells == {("s2l", 8, 0), ("s2l", 8, 1)}
    for c in results["cells"]:
        assert c["examples"] == c["budget"] and 0.0 <= c["accuracy"] <= 1.0 and c["loss"] > 0
        assert set(c["sources"]) == {"gcd", "basic_arithmetic"}
        metrics = json.loads((tmp_path / "bench" / "targets" / f"{c['method']}-{c['budget']}" / f"seed{c['seed']}"
                              / "eval" / "metrics.json").read_text())
        assert metrics["overall"]["accuracy"] == c["accuracy"] and metrics["rows"] == 6
        assert c["source_loss"] == {s: m["loss"] for s, m in metrics["sources"].items()}
    rows = {(r["method"], r["budget"]): r for r in results["summary"]}
    s2l = [c for c in results["cells"] if c["method"] == "s2l"]
    assert rows[("s2l", 8)]["seeds"] == 2
    assert rows[("s2l", 8)]["loss"] == pytest.approx(sum(c["loss"] for c in s2l) / 2)
    sel = tmp_path / "bench" / "selections"
    assert (sel / "s2l" / "seed0" / "selected.jsonl").read_text() != (sel / "s2l" / "seed1" / "selected.jsonl").read_text()
    md = (tmp_path / "bench" / "results.md").read_text()
    assert "| s2l | 25% | 8 |" in md and "fine-tune, per cell" in md and "Response loss per source" in md
    assert (tmp_path / "bench" / "results.png").read_bytes()[:4] == b"\x89PNG"
    again = benchmark.run(cfg)  # every stage and cell reused: identical cells
    assert again["cells"] == results["cells"]
    # With checkpoints inside runs, each target gets its own worker group; training is the same.
    targets = tmp_path / "bench" / "targets"
    swept = json.loads((targets / "s2l-8" / "seed0" / "finetune.json").read_text())
    shutil.rmtree(targets)
    alone = benchmark.run(tiny(tmp_path, seeds="0", **{"finetune.checkpoint_every": 1}))  # selection reused
    (cell,) = alone["cells"]
    assert cell["seed"] == 0 and cell["examples"] == 8
    assert cell["loss"] == pytest.approx(next(c["loss"] for c in results["cells"] if c["seed"] == 0), abs=1e-5)
    assert swept["sweep_runs"] == 2
    assert "sweep_runs" not in json.loads((targets / "s2l-8" / "seed0" / "finetune.json").read_text())
    changed = tiny(tmp_path)
    changed.finetune.epochs = 2
    with pytest.raises(ConfigError, match="fine-tuned or evaluated with another finetune/evaluate config"):
        benchmark.run(changed)  # stale cells are refused, not silently reused


def test_benchmark_refuses_unknown_or_full_methods(tmp_path):
    for methods, message in (("s2l,kcenter", "unknown selection method 'kcenter'"), ("full", "use full: true")):
        cfg = load_config(None, {"output": str(tmp_path), "methods": methods}, cls=BenchmarkConfig)
        with pytest.raises(ConfigError, match=message):
            benchmark.prepare(cfg)
