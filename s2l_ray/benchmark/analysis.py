"""What the benchmark's cells say: means over seeds, paired comparisons with bootstrap intervals, the cost ledger.

A cell's evaluations are keyed by evaluation set: ``eval`` (the held-out set) and, when given,
``target`` (the one-task target evaluation set). Every method is compared with each baseline it
ran with (``BASELINES``), per budget and evaluation set, paired by seed and evaluation item
(``stats``). ``base`` (the target without fine-tuning) and ``full`` are reported, not compared.
"""
from __future__ import annotations

import json

import numpy as np

from ..config import BenchmarkConfig
from ..layout import resolve

# random-target-sources is the control for the target-aware methods: do the trajectories (or embeddings) add
# anything over matching the target's source mix?
BASELINES = ("random", "random-per-source", "random-target-sources")
NOT_COMPARED = ("full", "base")


def aggregate(cells: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each (method, budget), per evaluation set."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["method"], c["budget"]), []).append(c)
    rows = []
    for (method, budget), cs in groups.items():
        evals = {}
        for name in cs[0]["evals"]:
            es = [c["evals"][name] for c in cs]
            acc, loss = np.array([e["accuracy"] for e in es]), np.array([e["loss"] for e in es])
            sources = sorted(es[0]["sources"])
            evals[name] = {"accuracy": float(acc.mean()), "accuracy_std": float(acc.std()),
                           "loss": float(loss.mean()), "loss_std": float(loss.std()),
                           "sources": {s: float(np.mean([e["sources"][s] for e in es])) for s in sources},
                           "source_loss": {s: float(np.mean([e["source_loss"][s] for e in es])) for s in sources}}
        rows.append({"method": method, "budget": budget, "examples": cs[0]["examples"], "seeds": len(cs),
                     "evals": evals,
                     "seconds": {k: float(np.mean([c["seconds"][k] for c in cs])) for k in cs[0]["seconds"]}})
    return rows


def item_scores(predictions: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-item exact match (0/1) and response loss of one evaluation, in evaluation order."""
    fs, path = resolve(predictions)
    with fs.open_input_stream(path) as f:
        rows = [json.loads(line) for line in f.read().decode().splitlines()]
    return (np.array([float(r["correct"]) for r in rows]),
            np.array([np.nan if r["loss"] is None else r["loss"] for r in rows]))


def compare(cells: list[dict], cfg: BenchmarkConfig) -> list[dict]:
    """Every method against each baseline it ran with, per budget and evaluation set: paired per-seed differences
    in exact match and response loss, and their bootstrap intervals over seeds and evaluation items."""
    from ..stats import bootstrap_interval, paired_differences, verdict

    by = {(c["method"], c["budget"], c["seed"]): c for c in cells}
    seeds = list(cfg.seeds)
    out = []
    for (method, budget) in sorted({(c["method"], c["budget"]) for c in cells}):
        for base in BASELINES:
            if method in (base, *NOT_COMPARED) or any((m, budget, s) not in by for m in (method, base)
                                                      for s in seeds):
                continue
            if method in BASELINES and BASELINES.index(method) < BASELINES.index(base):
                continue  # two baselines are compared once, the later against the earlier
            for name in by[(method, budget, seeds[0])]["evals"]:
                a = [item_scores(by[(method, budget, s)]["evals"][name]["predictions"]) for s in seeds]
                b = [item_scores(by[(base, budget, s)]["evals"][name]["predictions"]) for s in seeds]
                for j, metric in enumerate(("accuracy", "loss")):
                    x, y = np.stack([v[j] for v in a]), np.stack([v[j] for v in b])
                    keep = np.isfinite(x).all(0) & np.isfinite(y).all(0)
                    mean, low, high = bootstrap_interval(x[:, keep], y[:, keep])
                    out.append({"method": method, "baseline": base, "budget": budget, "eval": name, "metric": metric,
                                "mean": mean, "low": low, "high": high,
                                "per_seed": paired_differences(x[:, keep], y[:, keep]).tolist(),
                                "verdict": verdict(low, high, lower_is_better=metric == "loss")})
    return out


def composition(drawn: dict[tuple[str, int], list[dict]], sources: list[str]) -> list[dict]:
    """Where each method's budget goes: examples per source in its subsets, mean over seeds."""
    return [{"method": m, "budget": b, "sources": {s: float(np.mean([d.get(s, 0) for d in ds])) for s in sources}}
            for (m, b), ds in drawn.items()]


def ledger(manifest: dict, target: dict, cells: list[dict], cfg: BenchmarkConfig) -> dict:
    """The selection's cost (corpus, proxy training, scoring of the corpus and the target examples, embeddings,
    clustering) next to fine-tuning's, in core-seconds on CPU (compute seconds times the threads each worker
    or actor runs) or GPU-seconds. ``target`` is the target examples' manifest ({} without them)."""
    proxy, sel, ft = manifest.get("proxy", {}), cfg.selection, cfg.finetune
    gpu = bool(proxy.get("use_gpu"))
    unit = "GPU-seconds" if gpu else "core-seconds"
    per_worker = sel.proxy.workers.gpus if gpu else max(1, int(sel.proxy.workers.cpus))
    per_actor = sel.scoring.actors.gpus if gpu else max(1, int(sel.scoring.actors.cpus))
    timings = manifest.get("clusters", {}).get("timings", {})
    rescored = sum(r.get("compute_seconds", 0.0) for r in target.get("scoring") or [])  # a later target set
    embeddings = sum(s.get("compute_seconds", 0.0) for s in (manifest.get("stages", {}).get("embeddings", {}),
                                                               target.get("stages", {}).get("embeddings", {})))
    selection = {"corpus (tokenisation)": 0.0 if gpu else manifest["corpus"].get("tokenize_seconds", 0.0),
                 "proxy training": proxy.get("train_compute_seconds", 0.0) * per_worker,
                 "scoring": (proxy.get("score_compute_seconds", 0.0) + rescored) * per_actor,
                 "embeddings": embeddings * per_actor,
                 "clustering": 0.0 if gpu else timings.get("fit", 0.0) + timings.get("assign", 0.0)}
    per_ft = ft.workers.gpus if gpu else max(1, int(ft.workers.cpus))
    tuning: dict[str, list[float]] = {}
    for c in cells:
        if c.get("finetune_compute") is not None:
            tuning.setdefault(f"{c['method']} {c['budget']}", []).append(c["finetune_compute"] * per_ft)
    tuning_mean = {k: float(np.mean(v)) for k, v in tuning.items()}
    total = sum(selection.values())
    full = next((v for k, v in tuning_mean.items() if k.startswith("full ")), None)
    return {"unit": unit, "selection": selection, "selection_total": total, "finetune_mean": tuning_mean,
            "selection_to_full_finetune": total / full if full else None}
