"""The proxy stage: Ray Train fine-tunes the small model; each trajectory point is scored as it lands.

Training (``training.run``, plain PyTorch) reports a checkpoint at T steps spread evenly over training, uploaded
in the background while the next steps train. A Ray Train callback
(run in the Train controller) hands each persisted checkpoint to a scoring coordinator actor,
whose one Ray Data scoring job (``scoring.score_points``) scores the points one after another
while training goes on, its actors started once for the whole run. A rerun into the same run
directory scores the checkpoints that were persisted but not scored, and resumes training from
the latest checkpoint if T was not reached.
The target examples (``<run>/target``, when given) are scored at every point with the corpus, by
the same actors; a new target set is scored from the saved checkpoints alone, training nothing.
Workers read the stored corpus from the object store in a fresh seeded permutation each epoch
(``batches``), so a resumed run sees exactly the rows the uninterrupted one would have.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import ray
import torch
from ray.train import Checkpoint
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import batches
from .config import ProxyConfig, ScoringConfig
from .layout import RunDir
from .models import resolve_bf16, resolve_gpu
from .progress import Rate, log
from .scoring import score_points
from .training import Loop, steps_per_epoch


class ProxyError(ValueError):
    """The proxy run cannot be planned or scheduled as configured."""


class ScoringFailed(RuntimeError):
    """A trajectory point could not be scored: training stops at its next point rather than run on for nothing."""


@dataclass(frozen=True)
class Plan:
    """Where the T trajectory points fall in training."""

    rows_per_worker: int
    steps_per_epoch: int
    total_steps: int
    point_steps: tuple[int, ...]


def make_plan(n_rows: int, cfg: ProxyConfig) -> Plan:
    """Optimizer steps per epoch (each worker gets an equal share of rows; ``training.steps_per_epoch``) and T
    evenly spaced points ending at the last step."""
    per_worker, _, spe = steps_per_epoch(n_rows, cfg.workers.count, cfg.batch_size, cfg.grad_accum)
    if spe == 0:
        raise ProxyError(f"{n_rows} rows make no optimizer step: each of the {cfg.workers.count} workers needs at "
                         f"least grad_accum={cfg.grad_accum} batches of batch_size={cfg.batch_size} rows")
    total = spe * cfg.epochs
    if not 1 <= cfg.num_points <= total:
        raise ProxyError(f"proxy.num_points={cfg.num_points} must be between 1 and the {total} training steps")
    points = tuple(round((t + 1) * total / cfg.num_points) for t in range(cfg.num_points))
    return Plan(per_worker, spe, total, points)


def _initial_model(spec: dict) -> torch.nn.Module:
    """``{"dir": local model dir}`` (present on every node) or ``{"config": ..., "seed": ...}``."""
    from transformers import AutoModelForCausalLM

    from .models import load_model

    if spec.get("dir"):
        return load_model(spec["dir"])
    torch.manual_seed(spec["seed"])
    return AutoModelForCausalLM.from_config(spec["config"])


def _save_checkpoint(model: torch.nn.Module, optimizer, scheduler, step: int, t: int, path: str) -> None:
    model.save_pretrained(os.path.join(path, "model"), safe_serialization=True)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step, "t": t},
               os.path.join(path, "state.pt"))


def train_loop(config: dict) -> None:
    """Ray Train worker loop: the proxy fine-tuning run (``training.run``, plain PyTorch) with T checkpoint
    reports."""
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode
    from transformers import get_scheduler

    from . import training
    from .models import load_model

    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    step = 0
    resume = ray.train.get_checkpoint() or config["resume"]
    if resume is None:
        model = _initial_model(config["model"])
    else:  # loaded as a model directory: transformers maps saved names (embed_out) to the module's (lm_head)
        with resume.as_directory() as d:
            model = load_model(os.path.join(d, "model"))
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    scheduler = get_scheduler(config["schedule"], optimizer, num_warmup_steps=config["warmup_steps"],
                              num_training_steps=config["total_steps"])
    if resume is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if rank == 0:
            log(f"resumed from step {step} (trajectory point {state['t']})", "proxy")
    start_step = step  # where this attempt began: 0, or the checkpoint it resumed from
    model = ray.train.torch.prepare_model(model)
    inner = model.module if hasattr(model, "module") else model
    amp = torch.bfloat16 if resolve_bf16(config["precision"], device.type == "cuda") else None
    engine = training.TorchEngine(model, optimizer, scheduler, device, config["loop"].grad_accum, config["grad_clip"],
                                  amp)
    points = {s: t for t, s in enumerate(config["point_steps"])}
    recent: list[float] = []
    started, compute = time.time(), 0.0
    rate = Rate(config["total_steps"] - start_step, "steps")

    def at_step(s: training.Step) -> None:
        nonlocal recent, compute
        recent.append(s.loss)
        compute += s.compute_seconds
        if s.step not in points:
            return
        t = points[s.step]
        metrics = {"t": t, "step": s.step, "start_step": start_step, "epoch": s.epoch,
                   "train_loss": float(np.mean(recent)), "losses": recent, "compute_seconds": round(compute, 3),
                   "lr": engine.lr(), "seconds": round(time.time() - started, 2)}
        recent = []
        if rank == 0:
            log(f"point {t + 1}/{len(points)} at step {s.step}/{config['total_steps']}, training loss "
                f"{metrics['train_loss']:.4f} ({rate.phrase(s.step - start_step)})", "proxy")
        # uploaded in the background while training goes on (Ray removes the folder once it is stored)
        checkpoint = None
        if rank == 0:
            tmp = tempfile.mkdtemp(prefix="s2l-proxy-point-")
            _save_checkpoint(inner, optimizer, scheduler, s.step, t, tmp)
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"point-{t:03d}",
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    model.train()
    training.run(engine, config["data"], config["loop"], rank, world, step, at_step)


@ray.remote(num_cpus=0, max_concurrency=4, concurrency_groups={"gate": 2})
class ScoringCoordinator:
    """Receives persisted checkpoints and has them scored by one Ray Data job (``scoring.score_points``) that runs
    in a background thread for the whole proxy run: trajectory points ``points``, each for the run directories
    given (the corpus, and the target examples) that lack it. The job's actors start when the first checkpoint
    lands, beside training where the cluster has room for them and for ``training`` (the resources the training
    workers take in all), else once training has ended (so that they never hold what a restarted training worker
    needs). Once a point fails, the next checkpoint submitted is refused,
    which ends the training run."""

    def __init__(self, runs: list[str], points: list[int], cfg: ScoringConfig, use_gpu: bool, precision: str,
                 training: dict[str, float] | None = None):
        self.runs = [RunDir(u) for u in runs]
        self.todo = {t: [r.uri for r in self.runs if t not in r.done_points()] for t in points}
        self.args = (cfg, use_gpu, precision)
        self.training = training or {}  # what the training workers hold in all
        self.ready: dict[int, tuple] = {}
        self.training_over = False
        self.changed = threading.Condition()
        self.results: list[dict] = []
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def submit(self, t: int, step: int, checkpoint: Checkpoint, start_step: int, compute: list[float],
               losses: list[float]) -> None:
        """A checkpoint training just persisted: record it in the checkpoint index (a rerun resumes from it), then
        score it, or raise ``ScoringFailed`` when an earlier point failed.

        ``start_step`` is the step the training attempt that made it began at (0, or the
        checkpoint it resumed from after an interruption or a worker failure); ``compute`` the
        seconds each worker spent in training steps since then; ``losses`` the training loss of each
        step since the previous point (mean over workers).
        """
        self.runs[0].mark_checkpoint(t, {"step": step, "path": checkpoint.path, "start_step": start_step,
                                         "compute_seconds": compute, "losses": losses})
        if self.errors:
            raise ScoringFailed("; ".join(self.errors))
        self.score(t, step, checkpoint)

    def score(self, t: int, step: int, checkpoint: Checkpoint) -> None:
        """Hand an already recorded checkpoint to the scoring job."""
        with self.changed:
            self.ready[t] = (step, checkpoint, time.time())
            self.changed.notify_all()

    @ray.method(concurrency_group="gate")
    def checkpoint(self, t: int) -> tuple:
        """``(step, Checkpoint, when it was handed over)`` of point ``t``, once it has been (the scoring job's gate)."""
        with self.changed:
            self.changed.wait_for(lambda: t in self.ready)
            return self.ready[t]

    def failed(self) -> list[str]:
        """The points that failed so far, each with its error."""
        return list(self.errors)

    def _room(self) -> bool:
        """Whether the cluster as it stands holds every scoring actor beside what training takes."""
        cfg, use_gpu, _ = self.args
        need = cfg.actors.ray_resources(use_gpu, "scoring.actors")
        total = ray.cluster_resources()
        return all(total.get(k, 0.0) + 1e-9 >= self.training.get(k, 0.0) + v * cfg.actors.count
                   for k, v in need.items() if v)

    def _scored(self, rec: dict) -> None:
        log(f"point {rec['t']}: {rec['rows']:,} rows scored in {rec['seconds']:.1f}s "
            f"({rec['rows'] / max(rec['seconds'], 1e-9):,.0f} rows/s)", "scoring")
        self.results.append(rec)

    def _work(self) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.ready or self.training_over)
        if not self.training_over and not self._room():
            log("no room for the scoring actors beside training: the points are scored once training has ended",
                "scoring")
            with self.changed:
                self.changed.wait_for(lambda: self.training_over)
        todo = {t: runs for t, runs in self.todo.items() if runs}
        if not todo:
            return
        try:
            score_points(todo, ray.get_runtime_context().current_actor, *self.args, on_point=self._scored)
        except Exception as e:  # noqa: BLE001 - kept for submit() and finish()
            cause = _root_cause(e)
            t = min(set(todo) - {r["t"] for r in self.results})
            self.errors.append(f"trajectory point {t}: {type(cause).__name__}: {cause}")
            log(f"point {t} failed ({type(cause).__name__}: {cause}); training stops at its next point", "scoring")

    def finish(self) -> tuple[list[dict], list[str]]:
        """Once training has ended: wait for every point; the records of those scored and the errors of those that
        failed."""
        with self.changed:
            self.training_over = True
            self.changed.notify_all()
        self.thread.join()
        return sorted(self.results, key=lambda r: r["t"]), list(self.errors)


def _root_cause(e: BaseException) -> BaseException:
    """The user code's own exception inside Ray's and Ray Data's wrappings of it."""
    while True:
        inner = getattr(e, "cause", None) or e.__cause__
        if inner is None or inner is e:
            return e
        e = inner


def _finished(coordinator) -> list[dict]:
    """The coordinator's records once every point is scored; ``ScoringFailed`` naming each point that failed."""
    results, errors = ray.get(coordinator.finish.remote())
    if errors:
        raise ScoringFailed("; ".join(errors))
    return results


def score_saved(runs: list[RunDir], points: dict[int, tuple[int, Checkpoint]], cfg: ScoringConfig, use_gpu: bool,
                precision: str) -> list[dict]:
    """Score saved checkpoints (``{t: (step, Checkpoint)}``) where ``runs`` lack them, training nothing: the
    user's own checkpoints, or a run's persisted points; the records of the points scored."""
    coordinator = ScoringCoordinator.remote([r.uri for r in runs], sorted(points), cfg, use_gpu, precision)
    try:
        for t, (step, checkpoint) in points.items():
            ray.get(coordinator.score.remote(t, step, checkpoint))
        return _finished(coordinator)
    finally:
        ray.kill(coordinator)


def train_compute(checkpoints: dict[int, dict]) -> float:
    """Seconds all workers spent in training steps, over every attempt (each attempt's latest record counts)."""
    attempts: dict[int, float] = {}
    for rec in checkpoints.values():
        total = sum(rec.get("compute_seconds", []))
        attempts[rec["start_step"]] = max(attempts.get(rec["start_step"], 0.0), total)
    return round(sum(attempts.values()), 3)


def _trajectory_callback(coordinator):
    from ray.train.v2.api.callback import UserCallback

    class TrajectoryCallback(UserCallback):
        """Hands each reported checkpoint to the scoring coordinator."""

        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                m = metrics[0]
                ray.get(coordinator.submit.remote(int(m["t"]), int(m["step"]), checkpoint, int(m["start_step"]),
                                                  [float(r.get("compute_seconds", 0.0)) for r in metrics],
                                                  np.mean([r["losses"] for r in metrics], axis=0).tolist()))

    return TrajectoryCallback()


def run(run: RunDir, proxy: ProxyConfig, scoring: ScoringConfig, model_spec: dict, n_rows: int, pad_id: int,
        target: RunDir | None = None) -> dict:
    """Train the proxy and score every trajectory point not yet done, for the corpus and for the stored ``target``
    examples when given (from the saved checkpoints, training nothing, where only they lack a point); returns
    stage statistics: ``reused_points`` are the corpus's."""
    plan = make_plan(n_rows, proxy)
    run.remove_temporaries()  # an interrupted run's half-written files: never read, removed before new work
    runs = [run] + ([target] if target is not None else [])
    done = run.done_points()
    ckpts = run.proxy_checkpoints()
    todo = [t for t in range(proxy.num_points) if any(t not in r.done_points() for r in runs)]
    stats = {"plan": asdict(plan), "reused_points": sorted(done), "trained": False}
    if not todo:
        return stats
    if target is not None and set(done) >= set(range(proxy.num_points)):
        missing = [t for t in todo if t not in ckpts]
        if missing:
            raise ProxyError(f"the target examples need trajectory points {missing}, whose proxy checkpoints are not "
                             f"in {run.checkpoints_index} (removed?): only a new proxy run (a new --output) can "
                             "score them")
    use_gpu = resolve_gpu(proxy.use_gpu)
    stats["use_gpu"] = use_gpu
    last = max(ckpts) if ckpts else None
    train = last is None or last < proxy.num_points - 1
    resources = proxy.workers.ray_resources(use_gpu, "proxy.workers")
    here = ray.get_runtime_context().get_node_id()  # the driver's node: a lost worker node must not take it along
    coordinator = ScoringCoordinator.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)) \
        .remote([r.uri for r in runs], todo, scoring, use_gpu, proxy.precision,
                {k: v * proxy.workers.count for k, v in resources.items()} if train else None)
    try:
        for t in todo:  # persisted before an interruption (or before this target was given), never scored
            if t in ckpts:
                ray.get(coordinator.score.remote(t, ckpts[t]["step"], Checkpoint(ckpts[t]["path"], run.fs)))
        if train:
            started = time.time()
            _fit(run, proxy, plan, model_spec, pad_id, resources, use_gpu, coordinator,
                 resume=Checkpoint(ckpts[last]["path"], run.fs) if last is not None else None)
            stats.update(trained=True, resumed_from=last, train_seconds=round(time.time() - started, 2),
                         train_compute_seconds=train_compute(run.proxy_checkpoints()))
        stats["scored"] = _finished(coordinator)
    finally:
        ray.kill(coordinator)  # with it the scoring job's actors, should training have failed
    stats["score_compute_seconds"] = round(sum(r.get("compute_seconds", 0.0) for r in stats["scored"]), 3)
    return stats


def _fit(run: RunDir, proxy: ProxyConfig, plan: Plan, model_spec: dict, pad_id: int, resources: dict, use_gpu: bool,
         coordinator, resume: Checkpoint | None) -> None:
    """The Ray Train run: from ``resume`` (or the start) to the last point, each checkpoint handed to ``coordinator``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    parts = run.corpus_parts()
    data = batches.load(run.uri, [p[3] for p in parts], [p[2] for p in parts])
    config = {
        "model": model_spec, "lr": proxy.lr, "weight_decay": proxy.weight_decay, "schedule": proxy.schedule,
        "warmup_steps": int(proxy.warmup_ratio * plan.total_steps), "total_steps": plan.total_steps,
        "point_steps": list(plan.point_steps), "seed": proxy.seed, "precision": proxy.precision,
        "threads": max(1, int(proxy.workers.cpus)), "resume": resume, "data": data,
        "grad_clip": proxy.grad_clip,
        "loop": Loop(epochs=proxy.epochs, steps_per_epoch=plan.steps_per_epoch, micro_batch_size=proxy.batch_size,
                     seed=proxy.seed, pad_id=pad_id, grad_accum=proxy.grad_accum, packed=proxy.packed),
    }
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=proxy.workers.count, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            # the run directory's own filesystem (the S3 endpoint included), so that checkpoints go
            # where every other output goes; the path is then one inside it, without scheme
            name=f"proxy-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", storage_path=run.proxy_dir,
            storage_filesystem=run.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            failure_config=FailureConfig(max_failures=proxy.max_failures),
            callbacks=[_trajectory_callback(coordinator)]))
    try:
        trainer.fit()
    except Exception:
        if failed := ray.get(coordinator.failed.remote()):  # the scorer's error, not Ray Train's wrapping of it
            raise ScoringFailed(f"scoring failed, so training stopped: {'; '.join(failed)}") from None
        raise
