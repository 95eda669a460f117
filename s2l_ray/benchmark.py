"""The quality benchmark: selection methods side by side on one corpus and one evaluation set.

One selection run trains the proxy and records the trajectories once (and clusters them for
S2L); every method then picks its subsets from that run, for every seed. A target is fine-tuned
on each (method, budget, seed) subset and evaluated; ``full`` trains on everything. A method's
targets are fine-tuned in one sweep (one Ray Train worker group, ``finetune.run_many``; needs
``finetune.checkpoint_every: 0``) and evaluated in one pass, so the start-up of a worker group
is paid once per method, not per target. Everything lands under ``<output>/``::

    data/                          the demo mixture (when no corpus is given)
    bases/                         the pretrained bases (bases.enabled; bases.output shares another folder's)
    selection/                     the selection run (pipeline.select)
    clusters-global/               one global k-means over the same trajectories (method "s2l-global")
    selections/<method>/seed<s>/   selection[-<B>].parquet, selected[-<B>].jsonl
    targets/<method>-<B>/seed<s>/  fine-tuning output, eval/metrics.json, cell.json
    sweeps/<method>/               Ray Train's record of the method's sweep
    results.json, results.md, results.png

Each finished cell (``cell.json``) and each fine-tuned model is reused on rerun, as are the
selection run's stages and the methods' subsets, so an interrupted benchmark continues where
it stopped. With ``bases.enabled`` the proxy and the target start from bases pretrained once on
a broad maths mixture (``build_bases``), as in the paper's setting. ``results.md`` compares every
method with ``random`` and ``random-per-source`` (paired per seed, with bootstrap intervals over
seeds and items: ``stats``) and puts the cost of the selection next to that of fine-tuning.
"""
from __future__ import annotations

import posixpath
import time
from dataclasses import replace

import json

import numpy as np

from . import pipeline
from .selection import methods
from .config import BenchmarkConfig, ConfigError, CorpusConfig, FinetuneConfig, SelectConfig, TextConfig, to_dict
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

    check_methods(cfg)
    out = RunDir(cfg.output)
    sel, ft, ev = cfg.selection, cfg.finetune, cfg.evaluate
    if not sel.corpus.path:
        paths = _demo_data(sel.demo, out)
        if cfg.demo_train not in ("train", "train_chat") or cfg.demo_eval not in ("eval", "eval_gsm8k"):
            raise ConfigError(f"demo_train must be train or train_chat and demo_eval eval or eval_gsm8k, not "
                              f"{cfg.demo_train!r} / {cfg.demo_eval!r}")
        sel = replace(sel, corpus=replace(sel.corpus, path=paths[cfg.demo_train]),
                      text=replace(sel.text, tokenizer=sel.text.tokenizer or paths["tokenizer"]))
        ev = replace(ev, corpus=replace(ev.corpus, path=ev.corpus.path or paths[cfg.demo_eval]))
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

    check_methods(cfg)
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


GLOBAL = "s2l-global"  # S2L on one global k-means: for corpora without reliable sources


def check_methods(cfg: BenchmarkConfig) -> None:
    for name in cfg.methods:
        try:
            if name != GLOBAL and methods.get(name).full:
                raise ConfigError(f"methods: {name!r} takes every example: use full: true")
        except ValueError as e:
            raise ConfigError(f"methods: {e} (or {GLOBAL!r})") from None
    if not cfg.methods or not cfg.seeds or not cfg.budgets:
        raise ConfigError("methods, seeds and budgets must each list at least one value")


def global_dir(cfg: BenchmarkConfig) -> RunDir:
    """Where ``global_clusters`` puts the global k-means."""
    return RunDir(posixpath.join(cfg.output, "clusters-global"))


def global_clusters(run: RunDir, cfg: BenchmarkConfig) -> tuple[RunDir, dict]:
    """One k-means over every example (no split by source) on the selection run's trajectories, in
    ``<output>/clusters-global``; reused when made from the same trajectories and settings."""
    from .clustering import cluster_run

    dest, manifest = global_dir(cfg), run.read_manifest()
    k = cfg.global_k or cfg.selection.cluster.k * len(manifest["corpus"]["sources"])
    ccfg = replace(cfg.selection.cluster, per_source=False, k=k)
    key = stage_key(manifest["stages"]["proxy"]["key"], to_dict(ccfg), cfg.selection.seed)
    done = dest.read_manifest()
    if done.get("key") == key:
        return dest, done["clusters"]
    dest.ensure()
    stats = cluster_run(run, ccfg, seed=cfg.selection.seed, num_points=cfg.selection.proxy.num_points, dest=dest)
    dest.update_manifest(key=key, clusters=stats, cluster_config=to_dict(ccfg))
    log(f"{GLOBAL}: one k-means of {k} clusters over all sources, source purity {stats['source_purity']:.3f}")
    return dest, stats


def subset(run: RunDir, cfg: BenchmarkConfig, method: str, seed: int) -> tuple[RunDir, dict]:
    """The method's subsets for every budget (reused when already drawn with the same settings)."""
    from .selection.stage import select_run

    dest = RunDir(posixpath.join(cfg.output, "selections", method, f"seed{seed}"))
    stages = run.read_manifest()["stages"]  # what the subset depends on: the trajectories and clusters made
    clusters, ccfg, pick = None, cfg.selection.cluster, method
    upstream = {k: stages[k]["key"] for k in ("corpus", "proxy", "clusters")}
    if method == GLOBAL:
        clusters, _ = global_clusters(run, cfg)
        ccfg, pick = replace(ccfg, per_source=False), "s2l"
        upstream["clusters"] = clusters.read_manifest()["key"]
    key = stage_key(upstream, method, cfg.budgets, seed)
    done = dest.read_manifest()
    if done.get("key") == key:
        return dest, done["selection"]
    dest.ensure()
    started = time.time()
    stats = select_run(run, SelectConfig(method=pick, budgets=list(cfg.budgets)), ccfg, seed,
                       num_points=cfg.selection.proxy.num_points, dest=dest, clusters=clusters)
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
                               "evaluate": seconds},
                   "finetune_compute": summary.get("compute_seconds"),
                   "predictions": posixpath.join(out, "eval", "predictions.jsonl")}
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
    from .selection.allocation import resolve_budget

    started = time.time()
    cfg = prepare(cfg)
    out = RunDir(cfg.output)
    out.ensure()
    pipeline.ensure_ray()
    bases = build_bases(cfg) if cfg.bases.enabled else None
    if bases:
        cfg = replace(cfg, selection=replace(cfg.selection, proxy=replace(cfg.selection.proxy, model=bases["proxy"])),
                      finetune=replace(cfg.finetune, model=bases.get("target") or cfg.finetune.model))
    log(f"selection run (proxy, trajectories, clusters) in {cfg.selection.output}")
    manifest = pipeline.select(cfg.selection)
    run_dir = RunDir(cfg.selection.output)
    n = manifest["corpus"]["rows"]
    budgets = [resolve_budget(b, n) for b in cfg.budgets]
    several = len(budgets) > 1
    done: list[dict] = []
    drawn: dict[tuple[str, int], list[dict]] = {}  # the subsets' examples per source, per seed
    for method in cfg.methods + (["full"] if cfg.full else []):
        todo, sizes = [], [n] if method == "full" else budgets
        for seed in cfg.seeds:
            data, stats = subset(run_dir, cfg, method, seed)
            todo += [(budget, seed, data, stats) for budget in sizes]
            for budget in sizes:
                drawn.setdefault((method, budget), []).append(stats["budgets"][str(budget)]["sources"])
        done += cells(cfg, method, todo, several and method != "full")
    rows = aggregate(done)
    stages = manifest["stages"]
    results = {"config": to_dict(cfg), "rows": n, "budgets": budgets, "cells": done, "summary": rows,
               "selection_stages": {k: v.get("seconds") for k, v in stages.items()},
               "comparisons": compare(done, cfg), "cost": ledger(manifest, done, cfg), "bases": bases,
               "composition": [{"method": m, "budget": b, "sources": {s: float(np.mean([d.get(s, 0) for d in ds]))
                                                                      for s in manifest["corpus"]["sources"]}}
                               for (m, b), ds in drawn.items()],
               "global_clusters": global_dir(cfg).read_manifest().get("clusters")
               if GLOBAL in cfg.methods else None,
               "total_seconds": round(time.time() - started, 2)}
    run_dir.update_manifest(cost=results["cost"])
    table = benchmark_markdown(results)
    write_json_atomic(out.fs, out.path("results.json"), results)
    write_bytes_atomic(out.fs, out.path("results.md"), table.encode())
    write_bytes_atomic(out.fs, out.path("results.png"), plot_benchmark(rows, n))
    log(f"done in {results['total_seconds']:.0f}s: {out.uri_of('results.md')}, {out.uri_of('results.png')}")
    print(table, flush=True)
    return results


BASELINES = ("random", "random-per-source")


def _scores(cell: dict) -> tuple[np.ndarray, np.ndarray]:
    """A cell's per-item exact match (0/1) and response loss, in evaluation order."""
    fs, path = resolve(cell["predictions"])
    with fs.open_input_stream(path) as f:
        rows = [json.loads(line) for line in f.read().decode().splitlines()]
    return (np.array([float(r["correct"]) for r in rows]),
            np.array([np.nan if r["loss"] is None else r["loss"] for r in rows]))


def compare(cells: list[dict], cfg: BenchmarkConfig) -> list[dict]:
    """Every method against each baseline it ran with, per budget: paired per-seed differences in exact match
    and response loss, and their bootstrap intervals over seeds and evaluation items (``stats``)."""
    from .stats import bootstrap_interval, paired_differences, verdict

    by = {(c["method"], c["budget"], c["seed"]): c for c in cells}
    seeds = list(cfg.seeds)
    out = []
    for (method, budget) in sorted({(c["method"], c["budget"]) for c in cells}):
        for base in BASELINES:
            if method in (base, "full") or any((m, budget, s) not in by for m in (method, base) for s in seeds):
                continue
            a = [_scores(by[(method, budget, s)]) for s in seeds]
            b = [_scores(by[(base, budget, s)]) for s in seeds]
            for j, metric in enumerate(("accuracy", "loss")):
                x, y = np.stack([v[j] for v in a]), np.stack([v[j] for v in b])
                keep = np.isfinite(x).all(0) & np.isfinite(y).all(0)
                mean, low, high = bootstrap_interval(x[:, keep], y[:, keep])
                out.append({"method": method, "baseline": base, "budget": budget, "metric": metric, "mean": mean,
                            "low": low, "high": high, "per_seed": paired_differences(x[:, keep], y[:, keep]).tolist(),
                            "verdict": verdict(low, high, lower_is_better=metric == "loss")})
    return out


def ledger(manifest: dict, cells: list[dict], cfg: BenchmarkConfig) -> dict:
    """The selection's cost (corpus, proxy training, scoring, clustering) next to fine-tuning's, in
    core-seconds on CPU (compute seconds times the threads each worker or actor runs) or GPU-seconds."""
    proxy, sel, ft = manifest.get("proxy", {}), cfg.selection, cfg.finetune
    gpu = bool(proxy.get("use_gpu"))
    unit = "GPU-seconds" if gpu else "core-seconds"
    per_worker = sel.proxy.gpus_per_worker if gpu else max(1, int(sel.proxy.cpus_per_worker))
    per_actor = sel.scoring.gpus_per_actor if gpu else max(1, int(sel.scoring.cpus_per_actor))
    timings = manifest.get("clusters", {}).get("timings", {})
    selection = {"corpus (tokenisation)": 0.0 if gpu else manifest["corpus"].get("tokenize_seconds", 0.0),
                 "proxy training": proxy.get("train_compute_seconds", 0.0) * per_worker,
                 "scoring": proxy.get("score_compute_seconds", 0.0) * per_actor,
                 "clustering": 0.0 if gpu else timings.get("fit", 0.0) + timings.get("assign", 0.0)}
    per_ft = ft.gpus_per_worker if gpu else max(1, int(ft.cpus_per_worker))
    tuning: dict[str, list[float]] = {}
    for c in cells:
        if c.get("finetune_compute") is not None:
            tuning.setdefault(f"{c['method']} {c['budget']}", []).append(c["finetune_compute"] * per_ft)
    tuning_mean = {k: float(np.mean(v)) for k, v in tuning.items()}
    total = sum(selection.values())
    full = next((v for k, v in tuning_mean.items() if k.startswith("full ")), None)
    return {"unit": unit, "selection": selection, "selection_total": total, "finetune_mean": tuning_mean,
            "selection_to_full_finetune": total / full if full else None}


def build_bases(cfg: BenchmarkConfig) -> dict:
    """The pretrained bases, once: a proxy (``bases.proxy_preset``) and a target (``bases.target_preset``)
    trained from scratch as language models of whole texts (``text.train_on_prompt``) on a broad maths
    mixture, in ``bases.output`` (default ``<output>/bases``); reused on rerun and by other outputs with the same
    settings, tokenizer (by content) and demo generators, refused when any of them differs."""
    from pyarrow.fs import FileType

    from . import demo, finetune
    from .corpus import normalised
    from .models import PRESETS, load_tokenizer, preset_config

    b, out = cfg.bases, RunDir(cfg.bases.output or posixpath.join(cfg.output, "bases"))
    tokenizer, generator_args = cfg.selection.text.tokenizer, cfg.selection.demo.generator_args
    settings = {k: v for k, v in to_dict(b).items() if k != "output"}  # what the bases are made from
    digest = _file_digest(posixpath.join(tokenizer, "tokenizer.json"))
    key = stage_key(settings, digest or tokenizer, generator_args)
    done = out.read_manifest()
    if done and done.get("key") != key:
        raise ConfigError(f"{out.uri} holds bases pretrained with another bases config, tokenizer or demo generator "
                          f"settings ({done.get('config')}); use a new output or delete that folder")
    if done:  # written once both bases are trained
        return done
    roles = [("proxy", b.proxy_preset)] + ([("target", b.target_preset)] if b.target_preset else [])
    if any(p not in PRESETS for _, p in roles):
        raise ConfigError(f"bases: presets must be among {sorted(PRESETS)}")
    out.ensure()
    data = out.uri_of("pretraining.jsonl")
    if out.fs.get_file_info(out.path("pretraining.jsonl")).type == FileType.NotFound:  # kept when resumed
        held_out = {r["prompt"] for _, r in normalised(cfg.evaluate.corpus)}
        rows = [r for r in demo.pretraining_rows(b.sources, b.rows_per_source, b.seed, generator_args)
                if r["prompt"] not in held_out]
        write_bytes_atomic(out.fs, out.path("pretraining.jsonl"), "".join(json.dumps(r) + "\n" for r in rows).encode())
    text = TextConfig(template="{prompt}\n", tokenizer=tokenizer, max_length=b.max_length, train_on_prompt=True)
    runs = [FinetuneConfig(output=out.uri_of(role), preset=preset, seed=cfg.selection.proxy.seed, epochs=b.epochs,
                           lr=b.lr, micro_batch_size=b.micro_batch_size, length_window=b.length_window,
                           checkpoint_every=0,
                           num_workers=cfg.finetune.num_workers, cpus_per_worker=cfg.finetune.cpus_per_worker,
                           gpus_per_worker=cfg.finetune.gpus_per_worker, use_gpu=cfg.finetune.use_gpu,
                           corpus=CorpusConfig(path=data), text=text)
            for role, preset in roles]
    log(f"bases: pretraining {', '.join(f'a {p!r} {r}' for r, p in roles)} on {len(b.sources)} x "
        f"{b.rows_per_source} maths texts in {out.uri}")
    records = dict(zip([r for r, _ in roles], finetune.run_many(runs, sweep_dir=out.uri_of("sweep"))))
    tok = load_tokenizer(tokenizer)
    params = {role: _parameters(preset_config(p, tok, b.max_length)) for role, p in roles}
    stats = {"key": key, "config": to_dict(b), "generator_args": generator_args,
             **{r: rec["model"] for r, rec in records.items()},
             "parameters": params, "target_to_proxy": params["target"] / params["proxy"] if "target" in params else None,
             "final_loss": {r: rec["final_loss"] for r, rec in records.items()},
             "compute_seconds": {r: rec["compute_seconds"] for r, rec in records.items()}}
    out.update_manifest(**stats)
    return stats


def _file_digest(uri: str) -> str:
    """The SHA-256 prefix of a file's bytes; "" when there is no such file."""
    import hashlib

    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except (FileNotFoundError, OSError):
        return ""


def _parameters(config) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


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

