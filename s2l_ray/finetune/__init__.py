"""Target fine-tuning: DeepSpeed ZeRO inside a Ray Train TorchTrainer, resumable, exported as a HF model.

Every worker trains the same causal LM with ``deepspeed.initialize`` (a plain
``torch.optim.AdamW`` and a transformers LR schedule, so no DeepSpeed op is compiled) on its
share of the training rows, which are stored once, tokenised with the target's tokenizer, in the
output (``inputs.store_rows``) and read from the object store in a fresh seeded permutation each
epoch (``batches``). Every ``checkpoint_every`` optimizer steps all ranks write their DeepSpeed
shards as one Ray Train checkpoint in ``<output>/train``; a restarted worker group, and a rerun
of the same command into the same output, resume from the latest one at the exact micro-batch.
At the end rank 0 gathers the model and exports it (``record``: the layout of the output, which
may be a URI). ``run_many`` trains several independent runs one after another in one worker
group (a sweep), each exported the same way.

Modules: ``plan`` (steps, DeepSpeed JSON, settings key), ``inputs`` (data, model, stored rows),
``record`` (the output directory), ``worker`` (the Ray Train loop).
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace

from .. import tracking
from ..config import ConfigError, FinetuneConfig, to_dict
from ..layout import RunDir, stage_key
from ..models import resolve_gpu
from ..nodes import check_visible
from ..progress import log as _log
from .inputs import demo_paths, resolve_data, resolve_model, store_rows
from .plan import FinetuneError, Plan, config_key, deepspeed_config, make_plan
from .record import RUN_NAME, STATE_FILE, SUMMARY, latest_checkpoint, model_uri, read_state, read_summary, \
    write_summary, written
from .worker import train_loop

__all__ = ["FinetuneError", "Plan", "STATE_FILE", "SUMMARY", "deepspeed_config", "demo_paths", "dry_run",
           "latest_checkpoint", "make_plan", "resolve_data", "resolve_model", "run", "run_many"]
_SHARED = ("workers", "use_gpu", "max_failures")


def log(msg: str) -> None:
    _log(msg, "finetune")


def _prepare(cfg: FinetuneConfig) -> tuple[dict, bool]:
    """Check one run and store its rows: its finetune.json record, and whether it still needs training."""
    from ..corpus import input_fingerprint

    run = RunDir(cfg.output)
    tracking.check(cfg.tracking)
    data = resolve_data(cfg)
    cfg = replace(resolve_model(cfg), output=run.uri)
    check_visible({"data": data, "model": cfg.model, "text.tokenizer": cfg.text.tokenizer}, {"output": run.uri})
    use_gpu = resolve_gpu(cfg.use_gpu)
    run.ensure()
    ds_config = deepspeed_config(cfg, use_gpu)
    key = config_key(cfg)
    previous = read_summary(run)
    if previous and previous.get("key") != key:
        raise FinetuneError(f"{run.uri} holds a fine-tuning run with another config ({run.uri_of(SUMMARY)}); "
                            "use a new --output or delete that directory")
    data_key = stage_key(input_fingerprint(replace(cfg.corpus, path=data)), to_dict(cfg.text))
    if previous and previous.get("data_key") == data_key and previous.get("data_stats"):
        stats = previous["data_stats"]
    else:
        log(f"reading {data}")
        stats = store_rows(cfg, data, run)
        if previous and previous.get("data_stats", {}).get("fingerprint") != stats["fingerprint"]:
            raise FinetuneError(f"{run.uri} holds a fine-tuning run of other data than {data} "
                                f"({run.uri_of(SUMMARY)}); use a new --output or delete that directory")
    if previous and previous.get("status") == "done" and written(run, previous["plan"]):
        log(f"already fine-tuned: {model_uri(run)}")
        return previous, False
    plan = make_plan(stats["rows"], cfg)
    resume = latest_checkpoint(run.uri)
    summary = {"key": key, "status": "running", "config": to_dict(cfg), "data": data, "data_key": data_key,
               "data_stats": stats, "rows": stats["rows"], "use_gpu": use_gpu, "deepspeed": ds_config,
               "plan": asdict(plan), "resumed_from_step": resume["step"] if resume else None}
    if written(run, asdict(plan)):  # exported, but the driver stopped before recording it
        log(f"already fine-tuned: {model_uri(run)}")
        state = read_state(run)
        return _finish(summary, state, train_seconds=state["seconds"]), False
    write_summary(run, summary)
    log(f"{stats['rows']} rows ({sum(stats['dropped'].values())} dropped), {plan.total_steps} steps over "
        f"{cfg.epochs} epochs, ZeRO-{cfg.zero_stage}, {cfg.workers.count} workers, "
        f"{'packed' if cfg.packed else 'padded'} rows"
        + (f"; resuming from step {resume['step']}" if resume else ""))
    return summary, True


def dry_run(cfg: FinetuneConfig) -> str:
    """Check a fine-tuning config as far as it goes without its data, model or Ray; the plan, as lines."""
    gpu = cfg.use_gpu == "true"
    tracking.check(cfg.tracking)
    ds = deepspeed_config(cfg, gpu)
    make_plan(cfg.workers.count * cfg.micro_batch_size * cfg.grad_accum, cfg)  # the step arithmetic holds
    worker = cfg.workers.ray_resources(gpu, "workers")
    return "\n".join([
        f"data:     {cfg.corpus.path}" + (f" (budget {cfg.budget})" if cfg.budget else "") + f" -> {cfg.output}",
        f"model:    {cfg.model or f'a fresh {cfg.preset!r} model'}, tokenizer {cfg.text.tokenizer or cfg.model}",
        f"training: {cfg.epochs} epochs, lr {cfg.lr} {cfg.schedule}, {cfg.workers.count} workers x {worker}, "
        f"ZeRO-{ds['zero_optimization']['stage']}, batch {ds['train_batch_size']} "
        f"({cfg.micro_batch_size} x {cfg.grad_accum} accumulated x {cfg.workers.count}), "
        f"{'bf16' if ds['bf16']['enabled'] else 'fp32'}, checkpoint every {cfg.checkpoint_every or 'end only'}"])


def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune (or resume, or reuse a finished run in ``cfg.output``); returns what finetune.json records."""
    return run_many([cfg])[0]


def run_many(cfgs: list[FinetuneConfig], sweep_dir: str = "") -> list[dict]:
    """Fine-tune several independent runs one after another in one worker group; their finetune.json records.

    Starting a worker group (processes, process group, DeepSpeed) costs tens of seconds, which
    dominates short runs; a sweep pays it once. Runs already done are reused. With one run to
    do, it reports Ray Train checkpoints and resumes within the run. With several, they must
    share the worker-group fields (workers, use_gpu, max_failures) and have
    ``checkpoint_every`` 0: an interrupted sweep resumes run by run. ``sweep_dir`` (a path or
    URI) holds the sweep's Ray Train record.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .. import batches

    records: list[dict] = []
    todo: list[tuple[int, dict]] = []
    for i, cfg in enumerate(cfgs):
        summary, train = _prepare(cfg)
        records.append(summary)
        if train:
            todo.append((i, summary))
    if not todo:
        return records
    first = cfgs[todo[0][0]]
    if len(todo) > 1:
        for i, _ in todo:
            if cfgs[i].checkpoint_every:
                raise ConfigError(f"{cfgs[i].output}: checkpoint_every must be 0 in a sweep of several runs")
            if any(getattr(cfgs[i], f) != getattr(first, f) for f in _SHARED):
                raise ConfigError(f"{cfgs[i].output}: a sweep's runs must share {', '.join(_SHARED)}")
        if not sweep_dir:
            raise ConfigError("sweep_dir: several runs to fine-tune need a folder for the sweep's Ray Train record")
    storage = RunDir(sweep_dir) if len(todo) > 1 else RunDir(todo[0][1]["config"]["output"])
    jobs = []
    for _, s in todo:
        out = RunDir(s["config"]["output"])
        data = batches.load(out.uri, [out.path("corpus", f) for f in s["data_stats"]["files"]],
                            s["data_stats"]["part_rows"])
        jobs.append({"cfg": s["config"], "plan": s["plan"], "deepspeed": s["deepspeed"], "data": data,
                     "output": out.uri})
    use_gpu = todo[0][1]["use_gpu"]
    resources = first.workers.ray_resources(use_gpu, "workers")
    trainer = TorchTrainer(
        train_loop, train_loop_config={"jobs": jobs, "use_gpu": use_gpu, "env": tracking.environment()},
        scaling_config=ScalingConfig(num_workers=first.workers.count, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=RUN_NAME, storage_path=storage.root, storage_filesystem=storage.fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=max(1, first.keep_checkpoints)),
                             failure_config=FailureConfig(max_failures=first.max_failures)))
    started = time.time()
    trainer.fit()
    seconds = round(time.time() - started, 2)
    for _, summary in todo:
        out = RunDir(summary["config"]["output"])
        state = read_state(out)
        if state is None or not written(out, summary["plan"]):
            raise FinetuneError(f"{out.uri}: training ended without exporting the model")
        extra = {"train_seconds": state["seconds"]} | (
            {"sweep_seconds": seconds, "sweep_runs": len(todo)} if len(todo) > 1 else {})
        _finish(summary, state, **extra)
        log(f"done: step {state['step']}, loss {summary['final_loss']:.4f}; model in {model_uri(out)}")
    log(f"{len(todo)} run(s) fine-tuned in {seconds:.1f}s")
    return records


def _finish(summary: dict, state: dict, **extra) -> dict:
    """``summary`` completed from the trainer ``state`` (step, log) and written as finetune.json."""
    out = RunDir(summary["config"]["output"])
    steps = [e for e in state["log"] if "loss" in e]
    summary.update(status="done", model=model_uri(out), final_step=state["step"],
                   final_loss=steps[-1]["loss"] if steps else None,
                   compute_seconds=round(sum(e.get("compute", 0.0) for e in steps) * summary["plan"]["num_workers"], 3),
                   attempts=[e["step"] for e in state["log"] if e.get("event") == "start"], log=state["log"], **extra)
    write_summary(out, summary)
    return summary
