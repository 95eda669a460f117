"""Runs the selection stages in order, skipping what the run directory says is finished.

corpus (and the target examples, when given) -> proxy (training + trajectories of both) -> clusters
(and embeddings, for a method that needs them) -> selection. Each stage records a key
(a hash of the inputs and config it depends on) in the manifest; a finished stage with the
same key is reused, and expensive work (corpus, trajectories) made from other inputs is
refused rather than silently mixed with new work.
"""
from __future__ import annotations

import platform
import posixpath
import sys
import time

from . import __version__, tracking
from .config import ConfigError, S2LConfig, to_dict
from .layout import LayoutError, RunDir, absolute, exists, stage_key
from .nodes import check_visible
from .progress import log
from .report import write_html
from .selection import methods
from .stages import key_of, record, run_stage


def versions() -> dict:
    import pyarrow
    import ray
    import torch
    import transformers

    return {"s2l_ray": __version__, "python": platform.python_version(), "ray": ray.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__, "pyarrow": pyarrow.__version__}


def ensure_ray() -> None:
    """Start (or join) Ray with the console of ``progress``: the project's lines once each, Ray's own output only
    with ``--verbose``."""
    import ray

    from . import progress

    if not ray.is_initialized():
        ray.init(**progress.quiet_ray(progress.VERBOSE))
        log(f"Ray: {ray.cluster_resources()}")
    progress.start_console()


def prepare_inputs(cfg: S2LConfig, run: RunDir) -> tuple[S2LConfig, dict]:
    """Resolve the corpus (the demo's when none), the tokenizer dir and the proxy model spec.

    Data errors come first: a missing corpus is refused before any model is looked at, and when
    a model or tokenizer directory is unusable the corpus is read through once, so that a bad
    line is reported rather than the model. With neither a tokenizer nor a proxy model, a BPE
    tokenizer is trained on the corpus (saved in the run directory) and a fresh preset proxy used.
    """
    from dataclasses import replace

    from . import demo, official_losses
    from .corpus import check_records, discover
    from .hub import from_hub
    from .models import ModelError, load_model, load_tokenizer, own_checkpoints, preset_config

    hub: dict[str, dict] = {}  # Hub ids, resolved to their snapshots (published under the run's URI on a cluster)
    cfg = replace(cfg, corpus=replace(cfg.corpus, path=from_hub(cfg.corpus.path, "corpus.path", hub, run.uri, "dataset")),
                  select=replace(cfg.select, target=from_hub(cfg.select.target, "select.target", hub, run.uri,
                                                             "dataset")),
                  proxy=replace(cfg.proxy, model=from_hub(cfg.proxy.model, "proxy.model", hub, run.uri)),
                  text=replace(cfg.text, tokenizer=from_hub(cfg.text.tokenizer, "text.tokenizer", hub, run.uri)))
    is_demo = not cfg.corpus.path
    if is_demo:
        log(f"no corpus given: building the demo corpus ({len(cfg.demo.sources)} reasoning-gym sources) "
            f"in {demo.DEMO_ROOT}")
        paths = demo.build(cfg.demo, demo.DEMO_ROOT)
        cfg = replace(cfg, corpus=replace(cfg.corpus, path=paths["train"]),
                      text=replace(cfg.text, tokenizer=cfg.text.tokenizer or paths["tokenizer"]))
    discover(cfg.corpus)
    if cfg.select.target:  # a few hundred rows: every record is checked here, before anything starts
        check_records(target_config(cfg))
    cfg = replace(cfg, proxy=replace(cfg.proxy, model=absolute(cfg.proxy.model)))  # Train workers run elsewhere
    points = own_checkpoints([absolute(p) for p in cfg.proxy.checkpoints]) if cfg.proxy.checkpoints else []
    losses = official_losses.loss_files([absolute(p) for p in cfg.proxy.losses]) if cfg.proxy.losses else []
    if points or losses:
        if cfg.proxy.model or (points and losses):
            raise ConfigError("proxy.model, proxy.checkpoints and proxy.losses: give one (your checkpoints, or the "
                              "official code's losses, are the proxy)")
        log(f"proxy: your {len(points or losses)} " + ("checkpoints" if points else "losses.pt files")
            + f" (steps {[s for s, _ in points or losses]}) are the trajectory points; no proxy is trained")
        cfg = replace(cfg, proxy=replace(cfg.proxy, num_points=len(points or losses)))
    tokenizer_dir = cfg.text.tokenizer or cfg.proxy.model or (points[0][1] if points else "") or (
        official_losses.tokenizer_beside(losses[0][1]) if losses else "")
    try:
        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        if cfg.proxy.model:
            load_model(cfg.proxy.model)  # fail fast on a bad directory
    except ModelError:
        check_records(cfg.corpus)  # a bad corpus is the first thing to fix
        raise
    if tok is None:
        tokenizer_dir = corpus_tokenizer(run, cfg)
        tok = load_tokenizer(tokenizer_dir)
    cfg = replace(cfg, text=replace(cfg.text, tokenizer=tokenizer_dir))
    spec = {"dir": cfg.proxy.model} if cfg.proxy.model else {
        "config": preset_config(cfg.proxy.preset, tok, cfg.text.max_length), "seed": cfg.proxy.seed}
    return cfg, {"spec": spec, "pad_id": tok.pad_token_id, "demo": is_demo, "hub": hub, "points": points,
                 "losses": losses}


def target_config(cfg: S2LConfig):
    """The target examples' corpus settings: the corpus's column mapping, read from ``select.target``."""
    from dataclasses import replace

    return replace(cfg.corpus, path=cfg.select.target)


def corpus_tokenizer(run: RunDir, cfg: S2LConfig) -> str:
    """A byte-level BPE tokenizer trained on (a sample of) the corpus, in ``<run>/tokenizer`` (reused when
    trained on the same input with the same vocabulary size)."""
    from .corpus import input_fingerprint, sample_texts
    from .demo import train_tokenizer
    from .layout import read_json, write_json_atomic

    if "://" in run.uri:
        raise ConfigError(f"output {run.uri}: a tokenizer trained on the corpus is kept in a local run directory; "
                          "give text.tokenizer or proxy.model (a model directory), or a local --output")
    path = run.path("tokenizer")
    stamp = {"input": input_fingerprint(cfg.corpus), "vocab_size": cfg.text.vocab_size}
    if read_json(run.fs, run.path("tokenizer", "s2l_tokenizer.json")) == stamp:
        return path
    log(f"no tokenizer or proxy model given: training a {cfg.text.vocab_size}-token BPE tokenizer on the corpus")
    texts = sample_texts(cfg.corpus, 100_000, seed=0)
    train_tokenizer(texts, cfg.text.vocab_size, path)
    write_json_atomic(run.fs, run.path("tokenizer", "s2l_tokenizer.json"), stamp)
    log(f"tokenizer: {path} (trained on {len(texts)} rows)")
    return path


def run_corpus(run: RunDir, cfg: S2LConfig) -> dict:
    from .corpus import drop_summary, input_fingerprint, store

    def work() -> dict:
        if run.done_points() or run.proxy_checkpoints():
            raise LayoutError(f"{run.uri} holds trajectories of another corpus or text config; "
                              "use a new --output or delete that directory")
        log(f"corpus: reading {cfg.corpus.path}")
        return store(run, cfg.corpus, cfg.text, cfg.text.tokenizer, part_rows=cfg.corpus.part_rows,
                     piece_bytes=int(cfg.corpus.piece_mb * 2**20))

    started = time.time()
    stats, reused = run_stage(run, "corpus", stage_key(input_fingerprint(cfg.corpus), to_dict(cfg.text)), work)
    if reused:
        log(f"corpus: reusing {stats['rows']} stored rows")
        return stats
    log(f"corpus: {stats['rows']} rows in {len(stats['files'])} parts ({stats['pieces']} pieces read), "
        f"{len(stats['sources'])} sources, {stats['truncated']} truncated to {cfg.text.max_length} tokens "
        f"({time.time() - started:.1f}s)")
    if dropped := drop_summary(stats):
        log(f"corpus: dropped {sum(stats['dropped'].values())} rows: {dropped}; corpus.strict: true makes these "
            "errors")
    return stats


def run_target(run: RunDir, cfg: S2LConfig) -> dict | None:
    """Store the target examples in ``<run>/target`` like the corpus; another target set replaces the folder
    (its trajectories and embeddings with it), never touching the corpus's."""
    from .corpus import drop_summary, input_fingerprint, store

    target = run.target
    if not cfg.select.target:
        return None
    tcfg = target_config(cfg)

    def work() -> dict:
        if exists(target.fs, target.root):
            log(f"target: {cfg.select.target} replaces the target examples in {target.uri}")
            target.fs.delete_dir(target.root)
        return store(target, tcfg, cfg.text, cfg.text.tokenizer, part_rows=cfg.corpus.part_rows,
                     piece_bytes=int(cfg.corpus.piece_mb * 2**20))

    started = time.time()
    stats, reused = run_stage(target, "corpus", stage_key(input_fingerprint(tcfg), to_dict(cfg.text)), work)
    if reused:
        log(f"target: reusing {stats['rows']} stored target examples")
        return stats
    log(f"target: {stats['rows']} examples from {cfg.select.target}, sources {stats['sources']} "
        f"({time.time() - started:.1f}s)")
    if dropped := drop_summary(stats):
        log(f"target: dropped {sum(stats['dropped'].values())} rows: {dropped}")
    return stats


def run_proxy(run: RunDir, cfg: S2LConfig, inputs: dict, corpus: dict) -> dict:
    """Train the proxy and score its trajectory points. ``proxy.precision: auto`` is resolved here, once, for the
    workers and the scorers alike (bf16 on GPUs that do it natively, fp32 elsewhere), and recorded: a rerun where it
    resolves otherwise (another kind of node) is refused rather than mixing fp32 and bf16 points."""
    from dataclasses import replace

    from . import proxy
    from .models import resolve_bf16, resolve_gpu

    if inputs["points"]:  # the user's own checkpoints are the proxy
        key = stage_key(corpus["fingerprint"], inputs["points"], "own checkpoints")
    elif inputs["losses"]:  # the official code's losses are
        key = stage_key(corpus["fingerprint"], inputs["losses"], "official losses")
    else:
        p = to_dict(cfg.proxy)
        # precision: checked below; packed: the same losses; max_failures: restarts resume exactly
        for perf in ("workers", "use_gpu", "precision", "packed", "max_failures"):
            p.pop(perf)
        for later, default in (("grad_accum", 1), ("grad_clip", 1.0)):  # count when set: older runs keep their key
            if p[later] == default:
                p.pop(later)
        key = stage_key(corpus["fingerprint"], p, cfg.proxy.workers.count)  # the count fixes the training order
    rec = run.read_manifest().get("stages", {}).get("proxy")
    if rec and rec.get("key") != key:
        raise LayoutError(f"{run.uri} holds trajectories made with another proxy config (proxy.seed included) or "
                          "other checkpoints; use a new --output or delete that directory")
    precision = "bf16" if resolve_bf16(cfg.proxy.precision, resolve_gpu(cfg.proxy.use_gpu)) else "fp32"
    if rec and rec.get("precision", precision) != precision:
        raise LayoutError(f"{run.uri} holds trajectories made in {rec['precision']}, and proxy.precision="
                          f"{cfg.proxy.precision} resolves to {precision} here; set proxy.precision={rec['precision']}"
                          " to go on with them, or use a new --output")
    run.update_manifest(stages={"proxy": {"key": key, **({} if rec is None else rec), "precision": precision}})
    cfg = replace(cfg, proxy=replace(cfg.proxy, precision=precision))
    if not inputs["points"] and not inputs["losses"]:
        log(f"proxy: {cfg.proxy.num_points} trajectory points over {cfg.proxy.epochs} epochs, "
            f"{cfg.proxy.workers.count} workers, {precision}, {'packed' if cfg.proxy.packed else 'padded'} rows")
    started = time.time()
    target = run.target if cfg.select.target else None
    if inputs["points"]:
        stats = score_own_checkpoints(run, cfg, inputs["points"], target)
    elif inputs["losses"]:
        stats = import_losses(run, inputs["losses"])
    else:
        stats = proxy.run(run, cfg.proxy, cfg.scoring, inputs["spec"], corpus["rows"], inputs["pad_id"], target=target)
    if len(stats["reused_points"]) == cfg.proxy.num_points:  # the corpus's points reused: their record stays
        log(f"proxy: reusing the {len(stats['reused_points'])} finished trajectory points in "
            f"{run.uri_of('trajectories')}")
        if stats.get("scored"):
            target.update_manifest(scoring=stats["scored"], merge=False)
            log(f"target: scored at {len(stats['scored'])} trajectory points from the saved checkpoints "
                f"({time.time() - started:.1f}s)")
        return stats
    record(run, "proxy", key, started, stats, precision=precision)  # this run's statistics only
    log(f"proxy: trajectories complete in {run.uri_of('trajectories')} ({time.time() - started:.1f}s; "
        f"reused points {stats['reused_points']})")
    return stats


def score_own_checkpoints(run: RunDir, cfg: S2LConfig, points: list[tuple[int, str]], target: RunDir | None) -> dict:
    """The user's checkpoints as the trajectory points: each scored (the corpus, and the target examples when given)
    where a run lacks it, and recorded in the checkpoints index (embeddings read the last); no training."""
    from ray.train import Checkpoint

    from .layout import resolve
    from .models import resolve_gpu
    from .proxy import score_saved

    runs = [run] + ([target] if target is not None else [])
    reused = sorted(run.done_points())
    saved = {}
    for t, (step, uri) in enumerate(points):
        run.mark_checkpoint(t, {"step": step, "path": uri, "uri": uri})
        fs, path = resolve(uri)
        saved[t] = (step, Checkpoint(path, fs))
    for rec in score_saved(runs, saved, cfg.scoring, resolve_gpu(cfg.proxy.use_gpu), cfg.proxy.precision):
        log(f"proxy: point {rec['t'] + 1}/{len(points)}, your checkpoint at step {rec['step']}, scored "
            f"({rec['seconds']:.1f}s)")
    return {"checkpoints": [{"step": s, "uri": u} for s, u in points], "reused_points": reused, "trained": False}


def import_losses(run: RunDir, files: list[tuple[int, str]]) -> dict:
    """The official code's ``losses.pt`` files as the trajectory points, where the run lacks them; no training."""
    from .official_losses import import_point

    reused = sorted(run.done_points())
    for t, (step, path) in enumerate(files):
        if t not in reused:
            rec = import_point(run, t, step, path)
            log(f"proxy: point {t + 1}/{len(files)}, {path} (step {step}), {rec['rows']:,} rows imported")
    return {"losses": [{"step": s, "uri": u} for s, u in files], "reused_points": reused, "trained": False}


def run_clusters(run: RunDir, cfg: S2LConfig) -> dict:
    from .clustering import cluster_run

    ccfg = {k: v for k, v in to_dict(cfg.cluster).items() if k != "source_split"}  # the split is the selection's
    key = stage_key(key_of(run, "proxy"), ccfg, cfg.seed, "centroids")
    started = time.time()
    stats, reused = run_stage(run, "clusters", key,
                              lambda: cluster_run(run, cfg.cluster, seed=cfg.seed, num_points=cfg.proxy.num_points))
    if reused:
        log(f"clusters: reusing {run.uri_of('clusters.parquet')}")
        return stats
    sizes = sorted(stats["cluster_sizes"])
    log(f"clusters: {stats['k']} clusters ({stats['backend']}), sizes {sizes[0]}..{sizes[-1]}, "
        f"{stats['nan_count']} non-finite losses replaced ({time.time() - started:.1f}s)")
    return stats


def run_embeddings(run: RunDir, cfg: S2LConfig) -> None:
    """The final proxy checkpoint's mean-pooled hidden states of the corpus and the target examples (each
    computed once per proxy run and target set)."""
    from ray.train import Checkpoint

    from .embeddings import embed
    from .layout import resolve
    from .models import resolve_gpu

    key = stage_key(key_of(run, "proxy"), "embeddings")
    target = run.target
    runs = [r for r in (run, target) if key_of(r, "embeddings") != key]
    if not runs:
        log("embeddings: reusing the corpus's and the target examples'")
        return
    last = run.proxy_checkpoints().get(cfg.proxy.num_points - 1)
    if last is None:
        raise LayoutError(f"{run.checkpoints_index} lists no final proxy checkpoint to embed the rows with")
    started = time.time()
    precision = run.read_manifest()["stages"]["proxy"].get("precision", cfg.proxy.precision)  # the trajectories'
    fs, path = resolve(last["uri"]) if "uri" in last else (run.fs, last["path"])  # the user's own, or the proxy's
    done = embed(runs, Checkpoint(path, fs), cfg.scoring, resolve_gpu(cfg.proxy.use_gpu), precision)
    for r in runs:
        record(r, "embeddings", key, started, rows=done[r.uri]["rows"], compute_seconds=done[r.uri]["compute_seconds"])
    rows = ", ".join(f"{v['rows']} rows of {u}" for u, v in done.items())
    log(f"embeddings: {rows} ({time.time() - started:.1f}s)")


def run_select(run: RunDir, cfg: S2LConfig) -> dict:
    from .selection.stage import select_run

    started = time.time()  # always drawn again (it is cheap), so that its files are the ones this config makes
    stats, _ = run_stage(run, "selection", stage_key(to_dict(cfg.select), cfg.cluster.source_split, cfg.seed),
                         lambda: select_run(run, cfg.select, cfg.cluster, seed=cfg.seed, num_points=cfg.proxy.num_points),
                         reuse=False)
    log(f"selection: {cfg.select.method}, budgets {', '.join(stats['budgets'])} ({time.time() - started:.1f}s)")
    for note in stats.get("notes", []):
        log(f"selection: {note}")
    return stats


def summary(run: RunDir, cfg: S2LConfig) -> str:
    """The closing lines of a selection run: counts, where every output is, the next command."""
    m = run.read_manifest()
    budgets = m["selection"]["budgets"]
    several = len(budgets) > 1
    clustered = methods.get(m["selection"]["method"]).clusters
    lines = [f"selected with {m['selection']['method']} from {m['corpus']['rows']} examples "
             f"({len(m['corpus']['sources'])} sources)" + (f", {m['clusters']['k']} clusters:" if clustered else ":")]
    for b, rec in budgets.items():
        lines.append(f"  budget {b}: {rec['selected']} examples -> {run.uri_of(posixpath.basename(run.selected_jsonl(int(b) if several else None)))}")
    lines.append(f"  trajectories: {run.uri_of('trajectories')}")
    if m["config"]["select"]["target"]:
        target = run.target.read_manifest()["corpus"]
        lines.append(f"  target:       {target['rows']} examples ({', '.join(target['sources'])}) -> {run.target.uri}")
    if clustered:
        lines += [f"  clusters:     {run.uri_of('clusters.parquet')}"]
    lines += [f"  report:       {run.uri_of('report.html')}" + (f" (and {run.uri_of('report.png')})" if clustered else "")]
    lines += [f"  manifest:     {run.uri_of('manifest.json')}",
              f"  total time:   {m['total_seconds']:.1f}s"]
    budget = f" --budget {next(iter(budgets))}" if several else ""
    if m.get("demo"):
        lines.append(f"next: python jobs/finetune.py --data {run.uri}{budget}")
    else:
        lines.append(f"next: python jobs/finetune.py --data {run.uri}{budget} --model /path/to/your/target-model "
                     "--output <target output>")
    return "\n".join(lines)


def check_method(cfg: S2LConfig) -> methods.Method:
    """The selection method and the settings it reads, checked before any data is read or Ray started."""
    from .embeddings import RANKS
    from .selection.allocation import SPLITS

    try:
        method = methods.get(cfg.select.method)
    except ValueError as e:
        raise ConfigError(f"select.method: {e}") from None
    split = method.split if cfg.cluster.source_split == "auto" else cfg.cluster.source_split
    if cfg.cluster.source_split not in ("auto", *SPLITS):
        raise ConfigError(f"cluster.source_split must be auto or one of {list(SPLITS)}, not {cfg.cluster.source_split!r}")
    splits = method.sources or (method.clusters and cfg.cluster.per_source)
    if not cfg.select.target and (method.target or (splits and split == "target")):
        raise ConfigError(f"select.method {method.name!r}{' with source split target' if not method.target else ''} "
                          "needs target examples: give --target (select.target), a few hundred rows of your task")
    if not 0 <= cfg.select.target_smoothing <= 1:
        raise ConfigError(f"select.target_smoothing must be in [0, 1], got {cfg.select.target_smoothing}")
    if cfg.select.embedding_rank not in RANKS:
        raise ConfigError(f"select.embedding_rank must be one of {list(RANKS)}, not {cfg.select.embedding_rank!r}")
    return method


def check_config(cfg: S2LConfig) -> methods.Method:
    """Every check the config allows without its data, models or Ray; made by every run before any work starts
    (and by ``--dry-run``). Returns the selection method."""
    from . import official_losses
    from .clustering import BACKENDS
    from .selection.allocation import SelectionError

    method = check_method(cfg)
    if not cfg.select.budgets:
        raise SelectionError("select.budgets is empty")
    for b in cfg.select.budgets:
        if not b > 0 or (b >= 1 and not float(b).is_integer()):
            raise SelectionError(f"select.budgets: {b} is neither a whole count >= 1 nor a fraction in (0, 1)")
    if "{prompt}" not in cfg.text.template:
        raise ConfigError(f"text.template must contain {{prompt}}: {cfg.text.template!r}")
    if cfg.cluster.backend not in BACKENDS:
        raise ConfigError(f"cluster.backend must be one of {list(BACKENDS)}, not {cfg.cluster.backend!r}")
    tracking.check(cfg.tracking)
    for name in ("proxy.num_points", "proxy.workers.count", "proxy.batch_size", "proxy.grad_accum", "proxy.epochs",
                 "cluster.k", "scoring.actors.count"):
        value = cfg
        for part in name.split("."):
            value = getattr(value, part)
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, not {value}")
    if cfg.proxy.grad_clip < 0:
        raise ConfigError(f"proxy.grad_clip must be 0 (no clipping) or more, not {cfg.proxy.grad_clip}")
    if cfg.proxy.schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"proxy.schedule must be cosine, linear or constant, not {cfg.proxy.schedule!r}")
    cfg.proxy.workers.ray_resources(True, "proxy.workers")
    cfg.scoring.actors.ray_resources(True, "scoring.actors")
    if cfg.proxy.losses and cfg.select.target:
        raise ConfigError("select.target: the target examples are scored by a model, and losses.pt files hold none; "
                          "give the checkpoints that wrote them (--checkpoints) instead")
    if cfg.proxy.losses and method.score in official_losses.CONFIDENCE_SCORES:
        raise ConfigError(f"select.method {cfg.select.method!r} ranks by the gold-token probability, which losses.pt "
                          "files do not hold; give the checkpoints that wrote them (--checkpoints) instead")
    return method


def check_sizes(cfg: S2LConfig, method: methods.Method, rows: int) -> None:
    """What the stored corpus's row count decides, checked before the proxy trains: every budget selects 1..rows
    rows, no two the same, and the proxy's training steps hold its trajectory points."""
    from .proxy import ProxyError, make_plan
    from .selection.allocation import resolve_budgets

    if not method.full:
        resolve_budgets(cfg.select.budgets, rows)
    if cfg.proxy.checkpoints or cfg.proxy.losses:  # no proxy trains: nothing to fit in its steps
        return
    try:
        make_plan(rows, cfg.proxy)
    except ProxyError as e:
        raise ProxyError(f"{e} ({rows} rows over {cfg.proxy.workers.count} workers in batches of "
                         f"{cfg.proxy.batch_size}, {cfg.proxy.epochs} epochs)") from None


def resolve_device(cfg: S2LConfig) -> S2LConfig:
    """``proxy.use_gpu`` decided once, on the running Ray, for training, scoring and embeddings alike (an autoscaling
    cluster's GPU nodes joining mid-run change nothing)."""
    from dataclasses import replace

    from .models import resolve_gpu

    gpu = resolve_gpu(cfg.proxy.use_gpu, "proxy.use_gpu")
    return replace(cfg, proxy=replace(cfg.proxy, use_gpu="true" if gpu else "false"))


def check_gpus(cfg: S2LConfig) -> None:
    """On GPUs (as ``proxy.use_gpu`` resolves on the running Ray): refuse two proxy workers sharing a GPU (NCCL
    refuses two ranks on one device), and say when scoring cannot share the GPUs with training."""
    import ray

    from .models import resolve_gpu
    from .proxy import ProxyError

    if not resolve_gpu(cfg.proxy.use_gpu):
        return
    workers = cfg.proxy.workers
    if workers.count > 1 and workers.gpus <= 0.5:  # above a half, Ray gives each worker a GPU of its own
        raise ProxyError(f"proxy.workers.gpus={workers.gpus} with {workers.count} workers "
                         "can put two training ranks on one GPU, which NCCL refuses: give each worker more than half "
                         "a GPU (0.75 leaves room for a scoring actor, 1 a whole one) or train on one worker")
    gpus = ray.cluster_resources().get("GPU", 0)
    need = workers.count * workers.gpus + cfg.scoring.actors.gpus
    if gpus and gpus < need:
        log(f"proxy: training takes {workers.count * workers.gpus:g} of the cluster's {gpus:g} "
            f"GPUs and a scoring actor asks for {cfg.scoring.actors.gpus:g}: the points are scored as GPUs free "
            "up (after training, unless the cluster adds a GPU node)")


def dry_run(cfg: S2LConfig) -> str:
    """Check a selection config as far as it goes without its data, models or Ray; the plan, as lines."""
    from .models import resolve_bf16

    method = check_config(cfg)
    gpu = cfg.proxy.use_gpu == "true"
    bf16 = resolve_bf16(cfg.proxy.precision, gpu)
    worker = cfg.proxy.workers.ray_resources(gpu, "proxy.workers")
    actor = cfg.scoring.actors.ray_resources(gpu, "scoring.actors")
    return "\n".join([
        f"corpus:   {cfg.corpus.path or 'the built-in demo'} -> {cfg.output}",
        f"proxy:    {cfg.proxy.model or f'a fresh {cfg.proxy.preset!r} model'} (tokenizer "
        f"{cfg.text.tokenizer or cfg.proxy.model or 'trained on the corpus'}), {cfg.proxy.epochs} epochs, "
        f"{cfg.proxy.num_points} points, {cfg.proxy.workers.count} workers x {worker}, {'bf16' if bf16 else 'fp32'}",
        f"scoring:  {cfg.scoring.actors.count} actors x {actor}, {cfg.scoring.max_tokens} tokens a pass",
        f"clusters: k={cfg.cluster.k}{' per source' if cfg.cluster.per_source else ''}, backend "
        f"{cfg.cluster.backend}" + ("" if method.clusters else " (not used by this method)"),
        f"select:   {cfg.select.method}, budgets {cfg.select.budgets}, seed {cfg.seed}"
        + (f", target examples {cfg.select.target}" if cfg.select.target else "")])


def select(cfg: S2LConfig) -> dict:
    """The whole selection run; returns the manifest."""
    total = time.time()
    method = check_config(cfg)
    run = RunDir(cfg.output)
    cfg, inputs = prepare_inputs(cfg, run)  # bad paths fail here, before Ray starts
    ensure_ray()
    cfg = resolve_device(cfg)
    check_gpus(cfg)
    check_visible({"corpus.path": cfg.corpus.path, "select.target": cfg.select.target, "proxy.model": cfg.proxy.model,
                   "text.tokenizer": cfg.text.tokenizer}
                  | {f"proxy.checkpoints: {uri}": uri for _, uri in inputs["points"]}
                  | {f"proxy.losses: {uri}": uri for _, uri in inputs["losses"]},
                  {"output": run.uri})
    run.ensure()
    run.update_manifest(config=to_dict(cfg), versions=versions(), command=sys.argv, demo=inputs["demo"])
    run.update_manifest(hub=inputs["hub"], merge=False)  # each Hub id's repository and commit, this run's only
    with tracking.tracked(cfg.tracking, tracking.run_name(cfg.tracking, run.uri), to_dict(cfg)) as tracker:
        corpus = run_corpus(run, cfg)
        check_sizes(cfg, method, corpus["rows"])
        run_target(run, cfg)
        run_proxy(run, cfg, inputs, corpus)
        if method.clusters:
            run_clusters(run, cfg)
        if method.score and methods.SCORES[method.score] == "embeddings":
            run_embeddings(run, cfg)
        run_select(run, cfg)
        manifest = run.update_manifest(total_seconds=round(time.time() - total, 2))
        write_html(run)  # rewritten for every selection: the page shows the current one
        tracking.log_selection(tracker, run)
    log("done\n" + summary(run, cfg))
    return manifest
