"""The benchmark's grid: the selection run, every method's subsets, and a fine-tuned, evaluated target per cell.

Every method's targets are fine-tuned in one sweep (one Ray Train worker group, ``finetune.run_many``;
needs ``finetune.checkpoint_every: 0``) and evaluated in one pass per evaluation set, so the
start-up of a worker group and of an actor pool is paid once per benchmark, not per method or
target. Each finished cell (``cell.json``), each fine-tuned model, the selection run's stages
and the methods' subsets are reused on rerun, so an interrupted benchmark continues where it
stopped. With ``bases.enabled`` the proxy and the target start from bases pretrained once
(``bases.build_bases``).
"""
from __future__ import annotations

import posixpath
import time
from dataclasses import replace

from .. import pipeline, tracking
from ..config import BenchmarkConfig, ConfigError, S2LConfig, to_dict
from ..layout import RunDir, read_json, resolve, stage_key, write_bytes_atomic, write_json_atomic
from ..stages import key_of, run_stage
from ..progress import log as _log
from ..selection import methods
from ..selection.allocation import SPLITS
from . import analysis

GLOBAL = "s2l-global"  # S2L on one global k-means: for corpora without reliable sources


def log(msg: str) -> None:
    _log(msg, "benchmark")


def _read(uri: str) -> dict | None:
    fs, path = resolve(uri)
    return read_json(fs, path)


def _write(uri: str, obj: dict) -> None:
    fs, path = resolve(uri)
    write_json_atomic(fs, path, obj)


def parse_method(label: str) -> tuple[str, str]:
    """``name[@split]`` as (selection method or ``s2l-global``, source split or "")."""
    name, _, split = label.partition("@")
    if split and split not in SPLITS:
        raise ConfigError(f"methods: {label!r}: the source split after @ must be one of {list(SPLITS)}")
    if name != GLOBAL:
        try:
            method = methods.get(name)
        except ValueError as e:
            raise ConfigError(f"methods: {e} (or {GLOBAL!r}, and either with @{'|@'.join(SPLITS)})") from None
        if method.full:
            raise ConfigError(f"methods: {name!r} takes every example: use full: true")
    elif split:
        raise ConfigError(f"methods: {label!r}: {GLOBAL} has no source split (one k-means over every source)")
    return name, split


def check_methods(cfg: BenchmarkConfig) -> None:
    if not cfg.methods or not cfg.seeds or not cfg.budgets:
        raise ConfigError("methods, seeds and budgets must each list at least one value")
    target = bool(cfg.selection.select.target or cfg.demo_target)
    for label in cfg.methods:
        name, split = parse_method(label)
        if not target and ((name != GLOBAL and methods.get(name).target) or split == "target"):
            raise ConfigError(f"methods: {label!r} needs target examples: give selection.select.target (or "
                              "demo_target with the demo)")
    if cfg.demo_target not in ("", "target", "target_chat"):
        raise ConfigError(f"demo_target must be empty, target or target_chat, not {cfg.demo_target!r}")
    tracking.check(cfg.tracking)


def prepare(cfg: BenchmarkConfig) -> BenchmarkConfig:
    """Check the grid; point every stage at the benchmark's folders, the evaluation sets and the target examples."""
    check_methods(cfg)
    out = RunDir(cfg.output)
    sel, ft, ev, target_eval = cfg.selection, cfg.finetune, cfg.evaluate, cfg.target_eval
    if not sel.corpus.path:
        paths = _demo_data(sel.demo, out)
        if cfg.demo_train not in ("train", "train_chat") or cfg.demo_eval not in ("eval", "eval_gsm8k"):
            raise ConfigError(f"demo_train must be train or train_chat and demo_eval eval or eval_gsm8k, not "
                              f"{cfg.demo_train!r} / {cfg.demo_eval!r}")
        sel = replace(sel, corpus=replace(sel.corpus, path=paths[cfg.demo_train]),
                      text=replace(sel.text, tokenizer=sel.text.tokenizer or paths["tokenizer"]))
        ev = replace(ev, corpus=replace(ev.corpus, path=ev.corpus.path or paths[cfg.demo_eval]))
        if cfg.demo_target:
            sel = replace(sel, select=replace(sel.select, target=sel.select.target or paths[cfg.demo_target]))
            target_eval = target_eval or paths["eval_target"]
    if not ev.corpus.path:
        raise ConfigError("evaluate.corpus.path: a corpus is given, so give its held-out evaluation set too")
    tokenizer = ft.text.tokenizer or (sel.text.tokenizer if not ft.model else "")
    sel = replace(sel, output=out.uri_of("selection"), select=replace(sel.select, method="s2l",
                                                                       budgets=list(cfg.budgets)))
    ft = replace(ft, text=replace(ft.text, tokenizer=tokenizer))
    ev = replace(ev, text=replace(ev.text, tokenizer=ev.text.tokenizer or tokenizer))
    return replace(cfg, output=out.uri, selection=sel, finetune=ft, evaluate=ev, target_eval=target_eval)


def dry_run(cfg: BenchmarkConfig) -> str:
    """Check a benchmark config as far as it goes without data, models or Ray; the plan, as lines."""
    from .. import finetune

    check_methods(cfg)
    sel = replace(cfg.selection, select=replace(cfg.selection.select, method="s2l", budgets=list(cfg.budgets)),
                  output=posixpath.join(cfg.output, "selection"))
    ft = replace(cfg.finetune, output=posixpath.join(cfg.output, "targets", "<method>-<budget>", "seed<seed>"),
                 corpus=replace(cfg.finetune.corpus, path=posixpath.join(cfg.output, "selections", "<method>")))
    cells = len(cfg.methods) * len(cfg.budgets) * len(cfg.seeds) + (len(cfg.seeds) if cfg.full else 0)
    target = cfg.target_eval or ("the demo's held-out target task" if cfg.demo_target else "")
    return "\n".join([f"benchmark: {len(cfg.methods)} methods x {len(cfg.budgets)} budgets x {len(cfg.seeds)} seeds"
                      f"{' + full' if cfg.full else ''} = {cells} targets{' + the base model' if cfg.base else ''}"
                      f" -> {cfg.output}",
                      pipeline.dry_run(sel), finetune.dry_run(ft),
                      f"evaluate: {cfg.evaluate.corpus.path or 'the demo held-out split'}"
                      + (f" and {target}" if target else "") + f", {cfg.evaluate.actors.count} actors, "
                      f"{cfg.evaluate.max_new_tokens} new tokens"])


def global_dir(cfg: BenchmarkConfig) -> RunDir:
    """Where ``global_clusters`` puts the global k-means."""
    return RunDir(posixpath.join(cfg.output, "clusters-global"))


def global_clusters(run: RunDir, cfg: BenchmarkConfig) -> tuple[RunDir, dict]:
    """One k-means over every example (no split by source) on the selection run's trajectories, in
    ``<output>/clusters-global``; reused when made from the same trajectories and settings."""
    from ..clustering import cluster_run

    dest, manifest = global_dir(cfg), run.read_manifest()
    k = cfg.global_k or cfg.selection.cluster.k * len(manifest["corpus"]["sources"])
    ccfg = replace(cfg.selection.cluster, per_source=False, k=k)
    key = stage_key(key_of(run, "proxy"), to_dict(ccfg), cfg.selection.seed, "centroids")

    def work() -> dict:
        dest.ensure()
        return cluster_run(run, ccfg, seed=cfg.selection.seed, num_points=cfg.selection.proxy.num_points, dest=dest)

    stats, reused = run_stage(dest, "clusters", key, work, cluster_config=to_dict(ccfg))
    if reused:
        return dest, stats
    log(f"{GLOBAL}: one k-means of {k} clusters over all sources, source purity {stats['source_purity']:.3f}")
    return dest, stats


def subset(run: RunDir, cfg: BenchmarkConfig, label: str, seed: int) -> tuple[RunDir, dict]:
    """The method's subsets for every budget (reused when already drawn with the same settings)."""
    from ..selection.stage import select_run

    name, split = (label, "") if label == "full" else parse_method(label)  # full: the cells of full: true
    dest = RunDir(posixpath.join(cfg.output, "selections", label, f"seed{seed}"))
    stages = run.read_manifest()["stages"]  # what the subset depends on: the trajectories, clusters, target
    upstream = {k: stages[k]["key"] for k in ("corpus", "proxy", "clusters")}
    upstream["target"] = run.target.read_manifest().get("stages", {}).get("corpus", {}).get("key")
    clusters, ccfg, pick = None, cfg.selection.cluster, name
    if name == GLOBAL:
        clusters, _ = global_clusters(run, cfg)
        ccfg, pick = replace(ccfg, per_source=False), "s2l"
        upstream["clusters"] = key_of(clusters, "clusters")
    ccfg = replace(ccfg, source_split=split or "auto")
    select = replace(cfg.selection.select, method=pick, budgets=list(cfg.budgets))
    key = stage_key(upstream, label, cfg.budgets, seed, to_dict(select), ccfg.source_split)

    def work() -> dict:
        dest.ensure()
        started = time.time()
        stats = select_run(run, select, ccfg, seed, num_points=cfg.selection.proxy.num_points, dest=dest,
                           clusters=clusters)
        return {**stats, "seconds": round(time.time() - started, 2)}

    return dest, run_stage(dest, "selection", key, work)[0]


def evaluations(cfg: BenchmarkConfig, models: list[str], outputs: list[str]) -> list[dict]:
    """Each model on every evaluation set (``eval``, and ``target`` when given), one pass per set; per model,
    per set: exact match, loss, per source, and the per-item predictions file."""
    from .. import evaluate

    sets = [("eval", cfg.evaluate, "eval")]
    if cfg.target_eval:
        sets.append(("target", replace(cfg.evaluate, corpus=replace(cfg.evaluate.corpus, path=cfg.target_eval)),
                     "eval-target"))
    out: list[dict] = [{} for _ in models]
    for name, ecfg, folder in sets:
        outs = [posixpath.join(o, folder) for o in outputs]
        for rec, m, o in zip(out, evaluate.run_many([replace(ecfg, model=m, output=o) for m, o in zip(models, outs)]),
                             outs):
            rec[name] = {"accuracy": m["overall"]["accuracy"], "loss": m["overall"]["loss"],
                         "sources": {s: v["accuracy"] for s, v in m["sources"].items()},
                         "source_loss": {s: v["loss"] for s, v in m["sources"].items()},
                         "predictions": posixpath.join(o, "predictions.jsonl")}
    return out


def _cell_key(cfg: BenchmarkConfig, *parts) -> str:
    return stage_key(to_dict(cfg.finetune), to_dict(cfg.evaluate), cfg.target_eval, *parts)


def cells(cfg: BenchmarkConfig, todo: list[tuple[str, int, int, RunDir, dict, bool]]) -> list[dict]:
    """Fine-tune and evaluate every method's (budget, seed) cells, ``(method, budget, seed, subset, stats,
    several budgets)``.

    The unfinished cells of all methods are fine-tuned in one sweep (one worker group; with
    ``finetune.checkpoint_every`` > 0, one worker group each so that a run resumes from its
    checkpoints) and evaluated in one pass per evaluation set; a finished cell (its ``cell.json``) is reused.
    """
    from .. import finetune

    records: dict[int, dict] = {}
    pending = []  # (position, the record's first fields, selection seconds, the fine-tuning run)
    for n, (method, budget, seed, data, stats, several) in enumerate(todo):
        out = posixpath.join(cfg.output, "targets", f"{method}-{budget}", f"seed{seed}")
        key = _cell_key(cfg, key_of(data, "selection"))
        done = _read(posixpath.join(out, "cell.json"))
        if done is None:
            tune = replace(cfg.finetune, output=out, seed=seed, budget=budget if several else 0,
                           corpus=replace(cfg.finetune.corpus, path=data.uri))
            pending.append((n, {"key": key, "method": method, "budget": budget, "seed": seed}, stats["seconds"], tune))
        elif done.get("key") != key:
            raise ConfigError(f"{out} was fine-tuned or evaluated with another finetune/evaluate config or subset; "
                              "use a new output folder")
        else:
            records[n] = done
    if not pending:
        return [records[n] for n in range(len(todo))]
    runs = [tune for *_, tune in pending]
    names = ", ".join(dict.fromkeys(head["method"] for _, head, _, _ in pending))
    if cfg.finetune.checkpoint_every:  # checkpoints within a run: one worker group per run
        log(f"{names}: fine-tuning {len(runs)} target(s), one after another")
        summaries = [finetune.run(r) for r in runs]
    else:
        log(f"{names}: fine-tuning {len(runs)} target(s) in one sweep")
        summaries = finetune.run_many(runs, sweep_dir=posixpath.join(cfg.output, "sweeps", "targets"))
    started = time.time()
    outs = [r.output for r in runs]
    evals = evaluations(cfg, outs, outs)
    seconds = round((time.time() - started) / len(pending), 2)
    for (n, head, select_seconds, tune), summary, ev in zip(pending, summaries, evals):
        rec = {**head, "examples": summary["rows"], **{k: ev["eval"][k] for k in ("accuracy", "loss")}, "evals": ev,
               "seconds": {"select": select_seconds, "finetune": summary["train_seconds"], "evaluate": seconds},
               "finetune_compute": summary.get("compute_seconds")}
        _write(posixpath.join(tune.output, "cell.json"), rec)
        log(f"{head['method']}, {head['budget']} examples, seed {head['seed']}: "
            + "; ".join(f"{k}: exact match {100 * e['accuracy']:.1f}%, loss {e['loss']:.4f}" for k, e in ev.items()))
        records[n] = rec
    return [records[n] for n in range(len(todo))]


def base_cell(cfg: BenchmarkConfig, model: str) -> dict:
    """The target without fine-tuning, evaluated once (it has no seed), in ``<output>/targets/base``."""
    if not model:
        raise ConfigError("base: true needs a target model (finetune.model, or bases.target_preset)")
    out = posixpath.join(cfg.output, "targets", "base")
    key = _cell_key(cfg, model)
    done = _read(posixpath.join(out, "cell.json"))
    if done is not None and done.get("key") == key:
        return done
    started = time.time()
    (ev,) = evaluations(cfg, [model], [out])
    rec = {"key": key, "method": "base", "budget": 0, "seed": cfg.seeds[0], "examples": 0, "evals": ev,
           **{k: ev["eval"][k] for k in ("accuracy", "loss")},
           "seconds": {"select": 0.0, "finetune": 0.0, "evaluate": round(time.time() - started, 2)}}
    _write(posixpath.join(out, "cell.json"), rec)
    log("base model: " + "; ".join(f"{k}: exact match {100 * e['accuracy']:.1f}%" for k, e in ev.items()))
    return rec


def _with_bases(cfg: BenchmarkConfig) -> tuple[BenchmarkConfig, dict | None]:
    from .bases import build_bases

    if not cfg.bases.enabled:
        return cfg, None
    bases = build_bases(cfg)
    return replace(cfg, selection=replace(cfg.selection, proxy=replace(cfg.selection.proxy, model=bases["proxy"])),
                   finetune=replace(cfg.finetune, model=bases.get("target") or cfg.finetune.model)), bases


def _selection_run(sel: S2LConfig, labels: list[str]) -> tuple[RunDir, dict]:
    """The selection run (proxy, trajectories, clusters) and the embeddings when a method ranks by them."""
    log(f"selection run (proxy, trajectories, clusters) in {sel.output}")
    pipeline.select(sel)
    run_dir = RunDir(sel.output)
    needs = [parse_method(m)[0] for m in labels]
    if any(n != GLOBAL and methods.get(n).score and methods.SCORES[methods.get(n).score] == "embeddings"
           for n in needs):
        pipeline.run_embeddings(run_dir, sel)
    return run_dir, run_dir.read_manifest()


def run(cfg: BenchmarkConfig) -> dict:
    """The whole benchmark; returns what results.json holds."""
    from ..selection.allocation import resolve_budget
    from .tables import benchmark_markdown, plot_benchmark, results_html

    started = time.time()
    cfg = prepare(cfg)
    out = RunDir(cfg.output)
    out.ensure()
    pipeline.ensure_ray()
    cfg, bases = _with_bases(cfg)
    run_dir, manifest = _selection_run(cfg.selection, cfg.methods)
    n = manifest["corpus"]["rows"]
    budgets = [resolve_budget(b, n) for b in cfg.budgets]
    several = len(budgets) > 1
    done: list[dict] = [base_cell(cfg, cfg.finetune.model)] if cfg.base else []
    drawn: dict[tuple[str, int], list[dict]] = {}  # the subsets' examples per source, per seed
    todo = []
    for method in cfg.methods + (["full"] if cfg.full else []):
        sizes = [n] if method == "full" else budgets
        for seed in cfg.seeds:
            data, stats = subset(run_dir, cfg, method, seed)
            todo += [(method, budget, seed, data, stats, several and method != "full") for budget in sizes]
            for budget in sizes:
                drawn.setdefault((method, budget), []).append(stats["budgets"][str(budget)]["sources"])
    done += cells(cfg, todo)
    rows = analysis.aggregate(done)
    results = {"config": to_dict(cfg), "rows": n, "budgets": budgets, "cells": done, "summary": rows,
               "selection_stages": {k: v.get("seconds") for k, v in manifest["stages"].items()},
               "comparisons": analysis.compare(done, cfg),
               "cost": analysis.ledger(manifest, run_dir.target.read_manifest(), done, cfg), "bases": bases,
               "composition": analysis.composition(drawn, list(manifest["corpus"]["sources"])),
               "target": run_dir.target.read_manifest().get("corpus", {}).get("sources"),
               "global_clusters": global_dir(cfg).read_manifest().get("clusters")
               if GLOBAL in cfg.methods else None,
               "total_seconds": round(time.time() - started, 2)}
    run_dir.update_manifest(cost=results["cost"])
    table = benchmark_markdown(results)
    write_json_atomic(out.fs, out.path("results.json"), results)
    write_bytes_atomic(out.fs, out.path("results.md"), table.encode())
    write_bytes_atomic(out.fs, out.path("results.png"), plot_benchmark(rows, n))
    write_bytes_atomic(out.fs, out.path("results.html"), results_html(results).encode())
    with tracking.tracked(cfg.tracking, tracking.run_name(cfg.tracking, out.uri), to_dict(cfg)) as tracker:
        tracking.log_benchmark(tracker, results, out)
    log(f"done in {results['total_seconds']:.0f}s: {out.uri_of('results.md')}, {out.uri_of('results.html')}")
    print(table, flush=True)
    return results


def _demo_data(demo_cfg, out: RunDir) -> dict[str, str]:
    """The demo mixture under ``<output>/data`` (built locally, then copied when the output is a URI)."""
    import tempfile

    from pyarrow.fs import LocalFileSystem, copy_files

    from .. import demo

    if "://" not in out.uri:
        return demo.build(demo_cfg, out.path("data"))
    local = demo.build(demo_cfg, tempfile.mkdtemp(prefix="s2l-demo-"))
    copy_files(posixpath.dirname(local["train"]), out.path("data"), source_filesystem=LocalFileSystem(),
               destination_filesystem=out.fs)
    return {k: out.uri_of("data", posixpath.relpath(v, posixpath.dirname(local["train"]))) for k, v in local.items()}
