"""The quality benchmark: selection methods side by side on one corpus and one evaluation set.

One selection run trains the proxy and records the trajectories once (and clusters them for
S2L); every method then picks its subsets from that run, for every seed. A target is fine-tuned
on each (method, budget, seed) subset and evaluated; ``full`` trains on everything. A method's
targets are fine-tuned in one sweep (one Ray Train worker group, ``finetune.run_many``; needs
``finetune.checkpoint_every: 0``) and evaluated in one pass, so the start-up of a worker group
is paid once per method, not per target. Everything lands under ``<output>/``::

    data/                          the demo mixture (when no corpus is given)
    selection/                     the selection run (pipeline.select)
    selections/<method>/seed<s>/   selection[-<B>].parquet, selected[-<B>].jsonl
    targets/<method>-<B>/seed<s>/  fine-tuning output, eval/metrics.json, cell.json
    sweeps/<method>/               Ray Train's record of the method's sweep
    results.json, results.md, results.png

Each finished cell (``cell.json``) and each fine-tuned model is reused on rerun, as are the
selection run's stages and the methods' subsets, so an interrupted benchmark continues where
it stopped.
"""
from __future__ import annotations

import posixpath
import time
from dataclasses import replace

import numpy as np
from . import methods, pipeline
from .config import BenchmarkConfig, ConfigError, SelectConfig, to_dict
from .layout import RunDir, read_json, resolve, stage_key, write_bytes_atomic, write_json_atomic
from .progress import log as _log


def log(msg: str) -> None:
    _log(msg, "benchmark")


def _read(uri: str) -> dict | None:
    fs, path = resolve(uri)
    return read_json(fs, path)


def _write(uri: str, obj: dict) -> None:
    fs, path = resolve(uri)
    write_json_atomic(fs, path, obj)


def prepare(cfg: BenchmarkConfig) -> BenchmarkConfig:
    """Check the grid; point every stage at the benchmark's folders and the evaluation set."""

    for name in cfg.methods:
        try:
            if methods.get(name).full:
                raise ConfigError(f"methods: {name!r} takes every example: use full: true")
        except ValueError as e:
            raise ConfigError(f"methods: {e}") from None
    if not cfg.methods or not cfg.seeds or not cfg.budgets:
        raise ConfigError("methods, seeds and budgets must each list at least one value")
    out = RunDir(cfg.output)
    sel, ft, ev = cfg.selection, cfg.finetune, cfg.evaluate
    if not sel.corpus.path:
        paths = _demo_data(sel.demo, out)
        sel = replace(sel, corpus=replace(sel.corpus, path=paths["train"]),
                      text=replace(sel.text, tokenizer=sel.text.tokenizer or paths["tokenizer"]))
        ev = replace(ev, corpus=replace(ev.corpus, path=ev.corpus.path or paths["eval"]))
    if not ev.corpus.path:
        raise ConfigError("evaluate.corpus.path: a corpus is given, so give its held-out evaluation set too")
    tokenizer = ft.text.tokenizer or (sel.text.tokenizer if not ft.model else "")
    sel = replace(sel, output=out.uri_of("selection"), select=SelectConfig(method="s2l", budgets=list(cfg.budgets)))
    ft = replace(ft, text=replace(ft.text, tokenizer=tokenizer))
    ev = replace(ev, text=replace(ev.text, tokenizer=ev.text.tokenizer or tokenizer))
    return replace(cfg, output=out.uri, selection=sel, finetune=ft, evaluate=ev)


def dry_run(cfg: BenchmarkConfig) -> str:
    """Check a benchmark config as far as it goes without data, models or Ray; the plan, as lines."""
    from . import finetune

    for name in cfg.methods:
        try:
            if methods.get(name).full:
                raise ConfigError(f"methods: {name!r} takes every example: use full: true")
        except ValueError as e:
            raise ConfigError(f"methods: {e}") from None
    if not cfg.methods or not cfg.seeds or not cfg.budgets:
        raise ConfigError("methods, seeds and budgets must each list at least one value")
    sel = replace(cfg.selection, select=SelectConfig(method="s2l", budgets=list(cfg.budgets)),
                  output=posixpath.join(cfg.output, "selection"))
    ft = replace(cfg.finetune, output=posixpath.join(cfg.output, "targets", "<method>-<budget>", "seed<seed>"),
                 corpus=replace(cfg.finetune.corpus, path=posixpath.join(cfg.output, "selections", "<method>")))
    cells = len(cfg.methods) * len(cfg.budgets) * len(cfg.seeds) + (len(cfg.seeds) if cfg.full else 0)
    return "\n".join([f"benchmark: {len(cfg.methods)} methods x {len(cfg.budgets)} budgets x {len(cfg.seeds)} seeds"
                      f"{' + full' if cfg.full else ''} = {cells} targets -> {cfg.output}",
                      pipeline.dry_run(sel), finetune.dry_run(ft),
                      f"evaluate: {cfg.evaluate.corpus.path or 'the demo held-out split'}, "
                      f"{cfg.evaluate.num_actors} actors, {cfg.evaluate.max_new_tokens} new tokens"])


def subset(run: RunDir, cfg: BenchmarkConfig, method: str, seed: int) -> tuple[RunDir, dict]:
    """The method's subsets for every budget (reused when already drawn with the same settings)."""
    from .sampling import select_run

    dest = RunDir(posixpath.join(cfg.output, "selections", method, f"seed{seed}"))
    stages = run.read_manifest()["stages"]  # what the subset depends on: the trajectories and clusters made
    key = stage_key({k: stages[k]["key"] for k in ("corpus", "proxy", "clusters")}, method, cfg.budgets, seed)
    done = dest.read_manifest()
    if done.get("key") == key:
        return dest, done["selection"]
    dest.ensure()
    started = time.time()
    stats = select_run(run, SelectConfig(method=method, budgets=list(cfg.budgets)), cfg.selection.cluster, seed,
                       num_points=cfg.selection.proxy.num_points, dest=dest)
    stats["seconds"] = round(time.time() - started, 2)
    dest.update_manifest(key=key, selection=stats)
    return dest, stats


def cells(cfg: BenchmarkConfig, method: str, todo: list[tuple[int, int, RunDir, dict]], several: bool) -> list[dict]:
    """Fine-tune and evaluate one method's (budget, seed) cells, ``(budget, seed, subset, stats)``.

    The unfinished cells are fine-tuned in one sweep (one worker group; with
    ``finetune.checkpoint_every`` > 0, one worker group each so that a run resumes from its
    checkpoints) and evaluated in one pass; a finished cell (its ``cell.json``) is reused.
    """
    from . import evaluate, finetune

    records: dict[int, dict] = {}
    pending = []
    for n, (budget, seed, data, stats) in enumerate(todo):
        out = posixpath.join(cfg.output, "targets", f"{method}-{budget}", f"seed{seed}")
        key = stage_key(to_dict(cfg.finetune), to_dict(cfg.evaluate), data.read_manifest().get("key"))
        done = _read(posixpath.join(out, "cell.json"))
        if done is None:
            pending.append((n, budget, seed, data, stats, out, key))
        elif done.get("key") != key:
            raise ConfigError(f"{out} was fine-tuned or evaluated with another finetune/evaluate config or subset; "
                              "use a new output folder")
        else:
            records[n] = done
    if pending:
        runs = [replace(cfg.finetune, output=out, seed=seed, budget=budget if several else 0,
                        corpus=replace(cfg.finetune.corpus, path=data.uri)) for _, budget, seed, data, _, out, _ in pending]
        if cfg.finetune.checkpoint_every:  # checkpoints within a run: one worker group per run
            log(f"{method}: fine-tuning {len(runs)} target(s), one after another")
            summaries = [finetune.run(r) for r in runs]
        else:
            log(f"{method}: fine-tuning {len(runs)} target(s) in one sweep")
            summaries = finetune.run_many(runs, sweep_dir=posixpath.join(cfg.output, "sweeps", method))
        started = time.time()
        metrics = evaluate.run_many([replace(cfg.evaluate, model=p[5], output=posixpath.join(p[5], "eval"))
                                     for p in pending])
        seconds = round((time.time() - started) / len(pending), 2)
        for (n, budget, seed, _, stats, out, key), summary, m in zip(pending, summaries, metrics):
            rec = {"key": key, "method": method, "budget": budget, "seed": seed, "examples": summary["rows"],
                   "accuracy": m["overall"]["accuracy"], "loss": m["overall"]["loss"],
                   "sources": {s: v["accuracy"] for s, v in m["sources"].items()},
                   "source_loss": {s: v["loss"] for s, v in m["sources"].items()},
                   "seconds": {"select": stats["seconds"], "finetune": summary["train_seconds"],
                               "evaluate": seconds}}
            _write(posixpath.join(out, "cell.json"), rec)
            log(f"{method}, {budget} examples, seed {seed}: accuracy {100 * rec['accuracy']:.1f}%, "
                f"loss {rec['loss']:.4f}")
            records[n] = rec
    return [records[n] for n in range(len(todo))]


def aggregate(cells: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each (method, budget)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["method"], c["budget"]), []).append(c)
    rows = []
    for (method, budget), cs in groups.items():
        acc = np.array([c["accuracy"] for c in cs])
        loss = np.array([c["loss"] for c in cs])
        sources = sorted(cs[0]["sources"])
        rows.append({"method": method, "budget": budget, "examples": cs[0]["examples"], "seeds": len(cs),
                     "accuracy": float(acc.mean()), "accuracy_std": float(acc.std()),
                     "loss": float(loss.mean()), "loss_std": float(loss.std()),
                     "sources": {s: float(np.mean([c["sources"][s] for c in cs])) for s in sources},
                     "source_loss": {s: float(np.mean([c["source_loss"][s] for c in cs])) for s in sources},
                     "seconds": {k: float(np.mean([c["seconds"][k] for c in cs])) for k in cs[0]["seconds"]}})
    return rows


def run(cfg: BenchmarkConfig) -> dict:
    """The whole benchmark; returns what results.json holds."""
    from .report import benchmark_markdown, plot_benchmark
    from .sampling import resolve_budget

    started = time.time()
    cfg = prepare(cfg)
    out = RunDir(cfg.output)
    out.ensure()
    log(f"selection run (proxy, trajectories, clusters) in {cfg.selection.output}")
    manifest = pipeline.select(cfg.selection)
    run_dir = RunDir(cfg.selection.output)
    n = manifest["corpus"]["rows"]
    budgets = [resolve_budget(b, n) for b in cfg.budgets]
    several = len(budgets) > 1
    done: list[dict] = []
    for method in cfg.methods + (["full"] if cfg.full else []):
        todo = []
        for seed in cfg.seeds:
            data, stats = subset(run_dir, cfg, method, seed)
            todo += [(budget, seed, data, stats) for budget in ([n] if method == "full" else budgets)]
        done += cells(cfg, method, todo, several and method != "full")
    rows = aggregate(done)
    stages = manifest["stages"]
    results = {"config": to_dict(cfg), "rows": n, "budgets": budgets, "cells": done, "summary": rows,
               "selection_stages": {k: v.get("seconds") for k, v in stages.items()},
               "total_seconds": round(time.time() - started, 2)}
    table = benchmark_markdown(results)
    write_json_atomic(out.fs, out.path("results.json"), results)
    write_bytes_atomic(out.fs, out.path("results.md"), table.encode())
    write_bytes_atomic(out.fs, out.path("results.png"), plot_benchmark(rows, n))
    log(f"done in {results['total_seconds']:.0f}s: {out.uri_of('results.md')}, {out.uri_of('results.png')}")
    print(table, flush=True)
    return results


def _demo_data(demo_cfg, out: RunDir) -> dict[str, str]:
    """The demo mixture under ``<output>/data`` (built locally, then copied when the output is a URI)."""
    import tempfile

    from pyarrow.fs import LocalFileSystem, copy_files

    from . import demo

    if "://" not in out.uri:
        return demo.build(demo_cfg, out.path("data"))
    local = demo.build(demo_cfg, tempfile.mkdtemp(prefix="s2l-demo-"))
    copy_files(posixpath.dirname(local["train"]), out.path("data"), source_filesystem=LocalFileSystem(),
               destination_filesystem=out.fs)
    return {k: out.uri_of("data", posixpath.relpath(v, posixpath.dirname(local["train"]))) for k, v in local.items()}

