"""The Ray Train worker side of fine-tuning: DeepSpeed ZeRO training of each run in the worker group."""
from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from ..config import FinetuneConfig, TrackingConfig, from_dict
from ..layout import RunDir
from ..progress import Rate, log
from .plan import FinetuneError, Plan
from .record import STATE_FILE, export, written

DS_TAG = "ds"  # DeepSpeed checkpoint tag inside each reported checkpoint


def train_loop(loop: dict) -> None:
    """Ray Train worker: the runs of ``loop["jobs"]`` one after another in this worker group; a run whose
    model is already exported (before a worker-group restart, or by an earlier attempt) is skipped."""
    if not loop["use_gpu"]:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is first imported in this process
    os.environ.update(loop["env"])  # the driver's tracking settings
    for job in loop["jobs"]:
        if not written(RunDir(job["output"]), job["plan"]):
            _train(job, resume=len(loop["jobs"]) == 1)
            gc.collect()  # the run's DeepSpeed engine (it holds reference cycles) before the next run's


def gathered_state_dict(module: torch.nn.Module, zero_stage: int, rank: int) -> dict | None:
    """The full state dict on rank 0 (None elsewhere); gathers ZeRO-3 partitions one parameter at a time.

    A collective: every rank must call it.
    """
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=zero_stage == 3):
            if rank == 0:
                state[name] = p.detach().to("cpu", copy=True)
    if rank != 0:
        return None
    for mod_name, mod in module.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                state[f"{mod_name}.{name}" if mod_name else name] = buf.detach().to("cpu", copy=True)
    return state


PROGRESS_SECONDS = 15  # at most one progress line per this many seconds (and one at the end)


def _mean_over_ranks(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _checkpoint(engine, rank: int, state: dict) -> None:
    """Every rank's DeepSpeed shards (+ rank 0: the trainer state) as one Ray Train checkpoint, to resume from."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": state["step"]})
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(state))
        last = state["log"][-1]
        ray.train.report({"step": state["step"], "epoch": last.get("epoch", 0), "loss": last.get("loss")},
                         checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step-{state['step']:07d}")


def _export(engine, tokenizer, rank: int, zero_stage: int, state: dict, output: str) -> None:
    """The gathered model and the trainer state into ``output`` (rank 0 writes; a collective)."""
    import torch.distributed as dist

    full = gathered_state_dict(engine.module, zero_stage, rank)
    if rank == 0:
        export(engine.module, full, tokenizer, state, RunDir(output))
    dist.barrier()


def _train(job: dict, resume: bool) -> None:
    """One fine-tuning run, tracked by the worker of rank 0 (``tracking``)."""
    import ray.train

    from .. import tracking

    cfg = from_dict(FinetuneConfig, job["cfg"])
    track = cfg.tracking if ray.train.get_context().get_world_rank() == 0 else TrackingConfig()
    with tracking.tracked(track, tracking.run_name(cfg.tracking, job["output"]), job["cfg"]) as tracker:
        _steps(job, resume, cfg, tracker)


def _steps(job: dict, resume: bool, cfg: FinetuneConfig, tracker) -> None:
    """The DeepSpeed training steps of one run on this worker's share of its rows (``batches``: a fresh seeded
    permutation each epoch; a resumed run continues at the micro-batch where its checkpoint was); each step's loss
    and learning rate go to ``tracker``."""
    import deepspeed
    import ray.train
    from transformers import get_scheduler

    from .. import training
    from ..models import build_model, load_model, load_tokenizer

    plan = Plan(**job["plan"])
    torch.set_num_threads(max(1, int(cfg.workers.cpus)))
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    started = time.time()
    tokenizer = load_tokenizer(cfg.text.tokenizer)
    model = load_model(cfg.model) if cfg.model else build_model(cfg.preset, tokenizer, cfg.seed, cfg.text.max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=job["deepspeed"],
        lr_scheduler=lambda opt: get_scheduler(cfg.schedule, opt, num_warmup_steps=plan.warmup_steps,
                                               num_training_steps=plan.total_steps))
    step, history = 0, []
    checkpoint = ray.train.get_checkpoint() if resume else None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            loaded, _ = engine.load_checkpoint(d, tag=DS_TAG)
            if loaded is None:
                raise FinetuneError(f"checkpoint {checkpoint.path} holds no DeepSpeed state under {DS_TAG}/")
            saved = json.loads(Path(d, STATE_FILE).read_text())
        if saved["plan"] != job["plan"]:
            raise FinetuneError(f"checkpoint {checkpoint.path} was made with another plan {saved['plan']}, "
                                f"not {job['plan']}: use a new output directory")
        step, history = saved["step"], saved["log"]
    history.append({"event": "start", "step": step, "time": round(time.time(), 3)})
    if rank == 0:
        log(f"{cfg.output}: starting at step {step}/{plan.total_steps} (ZeRO-{cfg.zero_stage}, "
            f"{plan.num_workers} workers)", "finetune")
    rate, first, said = Rate(plan.total_steps - step, "steps"), step, time.time()
    ds = training.DeepSpeedEngine(engine)

    def at_step(s: training.Step) -> None:
        nonlocal said
        history.append({"step": s.step, "epoch": s.epoch, "loss": _mean_over_ranks(s.loss, ds.device),
                        "lr": ds.lr(),  # and the step's compute seconds, mean over ranks
                        "compute": round(_mean_over_ranks(s.compute_seconds, ds.device), 4)})
        tracker.metrics({"finetune/loss": history[-1]["loss"], "finetune/lr": history[-1]["lr"]}, step=s.step)
        if rank == 0 and (s.step == plan.total_steps or time.time() - said >= PROGRESS_SECONDS):
            said = time.time()
            log(f"step {s.step}/{plan.total_steps}, epoch {s.epoch}, loss {history[-1]['loss']:.4f}, lr "
                f"{history[-1]['lr']:.2e} ({rate.phrase(s.step - first)})", "finetune")
        state = {"step": s.step, "plan": job["plan"], "log": history}
        if s.step == plan.total_steps:
            _export(ds.engine, tokenizer, rank, cfg.zero_stage, state | {"seconds": round(time.time() - started, 2)},
                    job["output"])
        elif resume and cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0:
            _checkpoint(ds.engine, rank, state)

    engine.train()
    training.run(ds, job["data"], training.Loop(
        epochs=cfg.epochs, steps_per_epoch=plan.steps_per_epoch, micro_batch_size=cfg.micro_batch_size, seed=cfg.seed,
        pad_id=tokenizer.pad_token_id, grad_accum=cfg.grad_accum, length_window=cfg.length_window,
        packed=cfg.packed), rank, world, step, at_step)
