"""Target fine-tuning: DeepSpeed ZeRO inside a Ray Train TorchTrainer, resumable, exported as a HF model.

Every worker trains the same causal LM with ``deepspeed.initialize`` (a plain
``torch.optim.AdamW`` and a transformers LR schedule, so no DeepSpeed op is compiled) on its
Ray Data shard of the selected rows, tokenised with the proxy stage's template and
response-only labels. Every ``checkpoint_every`` optimizer steps all ranks write their
DeepSpeed shards and report them as one Ray Train checkpoint. A restarted worker group, and a
rerun of the same command into the same output, resume from the latest checkpoint Ray
recorded (same run name and storage path), skipping the micro-batches already consumed in
that epoch. The last checkpoint also holds the model gathered from the ZeRO shards, which the
driver copies out as a plain Hugging Face directory::

    <output>/
      train/          Ray Train storage: checkpoints (DeepSpeed shards of every rank) and Ray's run record
      model/          the fine-tuned model (safetensors) and its tokenizer
      finetune.json   config, data, plan, status, per-step log and the step each attempt started at

``run_many`` runs a sweep of several such runs in one worker group, one after another; each
writes ``model/`` and ``trainer_state.json`` (its log) directly, with no checkpoint in between.
With ``length_window`` > 1, micro-batches are grouped by length within shuffled windows: less
padding, but batches of similar rows (off by default: on the CPU benchmark it cost quality).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, DemoConfig, FinetuneConfig, from_dict, to_dict
from .layout import stage_key
from .models import resolve_bf16, resolve_gpu

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
RUN_NAME = "train"  # Ray Train run name under <output>: fixed, so that a rerun resumes its record
DS_TAG = "ds"  # DeepSpeed checkpoint tag inside each reported checkpoint
STATE_FILE = "trainer_state.json"  # step, plan and log, written by rank 0 into each checkpoint
HF_DIR = "hf"  # the gathered model inside the final checkpoint
SUMMARY = "finetune.json"
# The keys of the DeepSpeed JSON that FinetuneConfig owns: "auto" (or absent) is filled in; an
# explicit value must agree with the config.
_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
          "gradient_clipping", "bf16.enabled", "zero_optimization.stage")


class FinetuneError(ValueError):
    """Fine-tuning inputs or outputs are missing, inconsistent or unusable."""


def log(msg: str) -> None:
    print(f"[finetune {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class Plan:
    """How many rows each worker sees and how many optimizer steps that makes."""

    rows: int
    num_workers: int
    rows_per_worker: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_plan(rows: int, cfg: FinetuneConfig) -> Plan:
    """Each worker gets ``rows // num_workers`` rows; trailing micro-batches that do not fill a step are skipped."""
    if min(cfg.num_workers, cfg.micro_batch_size, cfg.grad_accum, cfg.epochs, cfg.length_window) < 1:
        raise ConfigError("num_workers, micro_batch_size, grad_accum, epochs and length_window must all be at least 1")
    per_worker = rows // cfg.num_workers
    micro = math.ceil(per_worker / cfg.micro_batch_size)
    spe = micro // cfg.grad_accum
    if spe == 0:
        raise FinetuneError(
            f"{rows} training rows make no optimizer step: each of the {cfg.num_workers} workers needs at least "
            f"grad_accum={cfg.grad_accum} micro-batches of micro_batch_size={cfg.micro_batch_size} rows")
    total = spe * cfg.epochs
    return Plan(rows, cfg.num_workers, per_worker, micro, spe, total, int(cfg.warmup_ratio * total))


def demo_paths() -> dict[str, str]:
    """The demo corpus under ``demo.DEMO_ROOT``: reused as it is when present, else built with defaults."""
    from . import demo

    root = Path(demo.DEMO_ROOT)
    if (root / "demo.json").is_file():
        return {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"),
                "tokenizer": str(root / "tokenizer")}
    log(f"building the demo corpus and tokenizer in {root}")
    return demo.build(DemoConfig(), str(root))


def resolve_data(cfg: FinetuneConfig) -> str:
    """The training data: the selection a run directory's manifest names, or ``corpus.path`` itself.

    In a selection run directory the file is the one its last selection wrote for ``budget``
    (required when it wrote several), never guessed from the files present.
    """
    from .layout import RunDir, exists, resolve

    path = cfg.corpus.path
    if not path:
        raise FinetuneError("no training data: pass --data (a selection run dir or a corpus path)")
    fs, root = resolve(path)
    info = fs.get_file_info(root)
    if info.type.name == "NotFound":
        raise FinetuneError(f"training data not found: {path} (run jobs/select.py first, or pass --data)")
    if info.type.name != "Directory":
        if cfg.budget:
            raise FinetuneError(f"budget={cfg.budget} picks a selection inside a run directory; {path} is a file")
        return path
    run = RunDir(path)
    manifest = run.read_manifest()
    if not exists(fs, run.manifest):
        if cfg.budget:
            raise FinetuneError(f"budget={cfg.budget} picks a selection inside a run directory; {path} has no "
                                "manifest.json")
        return path  # a folder of corpus shards
    budgets = list((manifest.get("selection") or {}).get("budgets", {}))
    if not budgets:
        raise FinetuneError(f"{path} is a selection run whose selection has not finished (no selection in its "
                            "manifest.json): rerun jobs/select.py")
    if cfg.budget and str(cfg.budget) not in budgets:
        raise FinetuneError(f"{path} has no selection of budget {cfg.budget} (its selection: {', '.join(budgets)})")
    if not cfg.budget and len(budgets) > 1:
        raise FinetuneError(f"{path} holds selections of budgets {', '.join(budgets)}; choose one with --budget")
    chosen = run.selected_jsonl(cfg.budget if len(budgets) > 1 else None)
    if not exists(fs, chosen):
        raise FinetuneError(f"{chosen} is missing although {run.manifest} records it")
    return run.uri_of(os.path.basename(chosen))


def resolve_model(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with absolute local model and tokenizer dirs (workers run elsewhere), both checked.

    The tokenizer is ``text.tokenizer``, else the model's. Without a model, a fresh ``preset``
    model is trained from scratch: for the demo (its tokenizer) or with a tokenizer given; a
    selection of the user's own corpus needs ``--model`` (the target), and is refused without.
    """
    from .layout import RunDir
    from .models import load_tokenizer

    if cfg.model and not Path(cfg.model, "config.json").is_file():
        raise FinetuneError(f"model directory {cfg.model} has no config.json (not a Hugging Face model dir)")
    if not cfg.model and not cfg.text.tokenizer:
        path = cfg.corpus.path
        if not (path == demo_paths()["train"] or ("://" not in path and os.path.isdir(path)
                                                  and RunDir(path).read_manifest().get("demo"))):
            raise FinetuneError(f"{path} was selected from your own corpus: pass --model with the target model to "
                                "fine-tune (a Hugging Face model dir); without one, only the built-in demo trains a "
                                f"fresh {cfg.preset!r} model")
    tokenizer = os.path.abspath(cfg.text.tokenizer or cfg.model or demo_paths()["tokenizer"])
    load_tokenizer(tokenizer)
    return replace(cfg, model=cfg.model and os.path.abspath(cfg.model), text=replace(cfg.text, tokenizer=tokenizer))


def deepspeed_config(cfg: FinetuneConfig, use_gpu: bool) -> dict:
    """The DeepSpeed config: the JSON file with its "auto" values filled from ``cfg``."""
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else CONFIG_DIR / f"ds_zero{cfg.zero_stage}.json"
    if cfg.zero_stage not in (1, 2, 3):
        raise ConfigError(f"zero_stage must be 1, 2 or 3, not {cfg.zero_stage}")
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove {key!r}; the optimizer (AdamW) and schedule come from lr, schedule, "
                              "warmup_ratio and weight_decay")
    bf16 = resolve_bf16(cfg.precision, use_gpu)
    values = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_accumulation_steps": cfg.grad_accum,
              "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * cfg.num_workers,
              "gradient_clipping": cfg.grad_clip, "bf16.enabled": bf16, "zero_optimization.stage": cfg.zero_stage}
    for dotted in _OWNED:
        *parents, leaf = dotted.split(".")
        node = ds
        for p in parents:
            node = node.setdefault(p, {})
        if node.get(leaf, "auto") not in ("auto", values[dotted]):
            raise ConfigError(f"{path}: {dotted} is {node[leaf]!r} but the fine-tuning config gives "
                              f"{values[dotted]!r}; set it to \"auto\"")
        node[leaf] = values[dotted]
    if cfg.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
        ds["zero_force_ds_cpu_optimizer"] = False  # the client AdamW is used as is
    if left := _autos(ds):
        raise ConfigError(f"{path}: no value for {left}; replace \"auto\" with a value")
    return ds


def _autos(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def store_rows(cfg: FinetuneConfig, data: str, out: Path) -> dict:
    """The training rows tokenised with the target's tokenizer into ``<out>/corpus/`` (``corpus.store``:
    rows with no response token left are dropped and counted); returns its statistics."""
    from .corpus import drop_summary, store
    from .layout import RunDir

    stats = store(RunDir(str(out)), replace(cfg.corpus, path=data), cfg.text, cfg.text.tokenizer,
                  part_rows=cfg.corpus.part_rows, piece_bytes=int(cfg.corpus.piece_mb * 2**20))
    if dropped := drop_summary(stats):
        log(f"dropped {sum(stats['dropped'].values())} rows: {dropped}")
    return stats


def latest_checkpoint(output: str) -> dict | None:
    """The latest checkpoint Ray recorded for the run in ``output``: ``{"step", "path"}``, or None."""
    from ray.train import Result

    run = Path(output).resolve() / RUN_NAME
    if not run.is_dir():
        return None
    try:
        result = Result.from_path(str(run))
    except (RuntimeError, ValueError):  # no run record yet, or one being written
        return None
    if result.checkpoint is None:
        return None
    return {"step": int((result.metrics or {}).get("step", -1)), "path": result.checkpoint.path}


# ---- the worker side -------------------------------------------------------------------------


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


def _say(msg: str) -> None:
    """Worker progress on stdout (Ray Train's patched print would show it twice)."""
    sys.stdout.write(f"[finetune] {msg}\n")
    sys.stdout.flush()


def _mean_over_ranks(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _save(engine, tokenizer, rank: int, zero_stage: int, state: dict, final: bool) -> None:
    """Write this rank's DeepSpeed shards (+ rank 0: trainer state, and the gathered model at the end); report."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": state["step"]})
        if final:
            full = gathered_state_dict(engine.module, zero_stage, rank)
            if rank == 0:
                engine.module.save_pretrained(os.path.join(tmp, HF_DIR), state_dict=full)
                tokenizer.save_pretrained(os.path.join(tmp, HF_DIR))
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(state))
        last = state["log"][-1]
        metrics = {"step": state["step"], "epoch": last.get("epoch", 0), "loss": last.get("loss", float("nan")),
                   "final": final}
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step-{state['step']:07d}")


def _write_model(engine, tokenizer, rank: int, zero_stage: int, state: dict, out: Path) -> None:
    """The gathered model into ``out/model`` and the trainer state beside it (rank 0; a collective)."""
    full = gathered_state_dict(engine.module, zero_stage, rank)
    if rank == 0:
        tmp = out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(tmp, state_dict=full)
        tokenizer.save_pretrained(tmp)
        _write_json(out / STATE_FILE, state)
        shutil.rmtree(out / "model", ignore_errors=True)
        os.replace(tmp, out / "model")
    import torch.distributed as dist

    dist.barrier()


def _written(output: str, plan: dict) -> bool:
    """Whether a sweep already wrote this run's model (``output``) for this ``plan``."""
    state = Path(output, STATE_FILE)
    return (Path(output, "model", "config.json").is_file() and state.is_file()
            and json.loads(state.read_text()).get("plan") == plan)


def train_loop(loop: dict) -> None:
    """Ray Train worker: the runs of ``loop["jobs"]`` one after another in this worker group.

    A single run reports Ray Train checkpoints and resumes from Ray's latest one; the runs of a
    sweep write their models directly and are skipped once written.
    """
    if not loop["use_gpu"]:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is first imported in this process

    report = len(loop["jobs"]) == 1
    for job in loop["jobs"]:
        if not report and _written(job["output"], job["plan"]):
            continue
        _train(job, report)


def _train(job: dict, report: bool) -> None:
    """One DeepSpeed fine-tuning run on this worker's share of its rows (``batches``: a fresh seeded
    permutation each epoch; a resumed run continues at the micro-batch where its checkpoint was)."""
    import gc

    import deepspeed
    import ray.train
    from transformers import get_scheduler

    from . import batches
    from .models import build_model, load_model, load_tokenizer
    from .text import collate, labels_from

    cfg = from_dict(FinetuneConfig, job["cfg"])
    plan = Plan(**job["plan"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    started = time.time()
    rows = batches.Rows(job["data"])
    tokenizer = load_tokenizer(cfg.text.tokenizer)
    model = load_model(cfg.model) if cfg.model else build_model(cfg.preset, tokenizer, cfg.seed, cfg.text.max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=job["deepspeed"],
        lr_scheduler=lambda opt: get_scheduler(cfg.schedule, opt, num_warmup_steps=plan.warmup_steps,
                                               num_training_steps=plan.total_steps))
    step, history = 0, []
    checkpoint = ray.train.get_checkpoint() if report else None
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
        _say(f"{cfg.output}: starting at step {step}/{plan.total_steps} (ZeRO-{cfg.zero_stage}, "
             f"{plan.num_workers} workers)")
    spe, gas = plan.steps_per_epoch, cfg.grad_accum
    every = max(1, plan.total_steps // 20)
    engine.train()
    for epoch in range(step // spe, cfg.epochs):
        skip, used = (step - epoch * spe) * gas, spe * gas
        acc = 0.0
        positions = batches.epoch_positions(job["data"].n, cfg.seed, epoch, rank, world)
        micro = batches.iterate(rows, positions, cfg.micro_batch_size, start=skip, windows=cfg.length_window,
                                group_seed=(cfg.seed, epoch, rank))
        for i, (ids, spans) in enumerate(micro, start=skip):
            if i >= used:
                break
            labels = [labels_from(x, sp) for x, sp in zip(ids, spans)]
            b = {k: v.to(engine.device) for k, v in collate(ids, labels, tokenizer.pad_token_id).items()}
            loss = engine(**b, use_cache=False).loss
            engine.backward(loss)
            engine.step()
            acc += loss.item()
            if (i + 1) % gas:
                continue
            step += 1
            history.append({"step": step, "epoch": epoch, "loss": _mean_over_ranks(acc / gas, engine.device),
                            "lr": engine.get_lr()[0]})
            acc = 0.0
            if rank == 0 and (step % every == 0 or step == plan.total_steps):
                _say(f"step {step}/{plan.total_steps} epoch {epoch} loss {history[-1]['loss']:.4f} "
                     f"lr {history[-1]['lr']:.2e}")
            final = step == plan.total_steps
            state = {"step": step, "plan": job["plan"], "log": history}
            if final and not report:
                _write_model(engine, tokenizer, rank, cfg.zero_stage,
                             state | {"seconds": round(time.time() - started, 2)}, Path(cfg.output))
            elif final or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                _save(engine, tokenizer, rank, cfg.zero_stage, state, final)
        if step != (epoch + 1) * spe:
            raise FinetuneError(f"rank {rank} ended epoch {epoch} at step {step}, not at the planned "
                                f"{(epoch + 1) * spe} ({plan.rows_per_worker} rows per worker)")
    del engine, model, optimizer
    gc.collect()


# ---- the driver side -------------------------------------------------------------------------


def _config_key(cfg: FinetuneConfig) -> str:
    """What a checkpoint depends on besides the data: training fields, model and tokenizer."""
    fields = to_dict(cfg)
    for perf in ("output", "checkpoint_every", "keep_checkpoints", "max_failures", "use_gpu", "cpus_per_worker",
                 "gpus_per_worker"):
        fields.pop(perf)
    fields["corpus"].pop("path")
    return stage_key(fields)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _copy_model(checkpoint, dest: Path) -> None:
    """Copy the gathered HF model out of the final checkpoint into ``dest`` (replacing it)."""
    import pyarrow.fs as pafs

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = f"{checkpoint.path.rstrip('/')}/{HF_DIR}"
    if checkpoint.filesystem.get_file_info(src).type == pafs.FileType.NotFound:
        raise FinetuneError(f"final checkpoint {checkpoint.path} holds no gathered model ({HF_DIR}/)")
    pafs.copy_files(src, str(tmp), source_filesystem=checkpoint.filesystem,
                    destination_filesystem=pafs.LocalFileSystem())
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def _prepare(cfg: FinetuneConfig) -> tuple[dict, bool]:
    """Check one run and store its rows: its finetune.json record, and whether it still needs training."""
    from .corpus import input_fingerprint

    if "://" in cfg.output:
        raise ConfigError(f"output must be a local or shared-filesystem path (the model is written there), "
                          f"not {cfg.output!r}")
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / SUMMARY
    data = resolve_data(cfg)
    cfg = replace(resolve_model(cfg), output=str(out))
    use_gpu = resolve_gpu(cfg.use_gpu)
    ds_config = deepspeed_config(cfg, use_gpu)
    key = _config_key(cfg)
    previous = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if previous and previous.get("key") != key:
        raise FinetuneError(f"{out} holds a fine-tuning run with another config ({summary_path}); "
                            "use a new --output or delete that directory")
    data_key = stage_key(input_fingerprint(replace(cfg.corpus, path=data)), to_dict(cfg.text))
    if previous and previous.get("data_key") == data_key and (out / "corpus").is_dir():
        stats = previous["data_stats"]
    else:
        log(f"reading {data}")
        stats = store_rows(cfg, data, out)
        if previous and previous.get("data_stats", {}).get("fingerprint") != stats["fingerprint"]:
            raise FinetuneError(f"{out} holds a fine-tuning run of other data than {data} ({summary_path}); "
                                "use a new --output or delete that directory")
    if previous and previous.get("status") == "done" and (out / "model" / "config.json").is_file():
        log(f"already fine-tuned: {out / 'model'}")
        return previous, False
    plan = make_plan(stats["rows"], cfg)
    resume = latest_checkpoint(str(out))
    summary = {"key": key, "status": "running", "config": to_dict(cfg), "data": data, "data_key": data_key,
               "data_stats": stats, "rows": stats["rows"], "use_gpu": use_gpu, "deepspeed": ds_config,
               "plan": asdict(plan), "resumed_from_step": resume["step"] if resume else None}
    if _written(str(out), asdict(plan)):  # a sweep wrote the model; its record was not finished
        log(f"already fine-tuned in a sweep: {out / 'model'}")
        state = json.loads((out / STATE_FILE).read_text())
        return _finish(summary, state, train_seconds=state["seconds"]), False
    _write_json(summary_path, summary)
    log(f"{stats['rows']} rows ({sum(stats['dropped'].values())} dropped), {plan.total_steps} steps over "
        f"{cfg.epochs} epochs, ZeRO-{cfg.zero_stage}, {cfg.num_workers} workers"
        + (f"; resuming from step {resume['step']}" if resume else ""))
    return summary, True


_SHARED = ("num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker", "max_failures")


def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune (or resume, or reuse a finished run in ``cfg.output``); returns what finetune.json records."""
    return run_many([cfg])[0]


def run_many(cfgs: list[FinetuneConfig], sweep_dir: str = "") -> list[dict]:
    """Fine-tune several independent runs one after another in one worker group; their finetune.json records.

    Starting a worker group (processes, process group, DeepSpeed) costs tens of seconds, which
    dominates short runs; a sweep pays it once. Runs already done are reused. With one run to
    do, it reports Ray Train checkpoints and resumes within the run (see the module doc). With
    several, they must share the worker-group fields (num_workers, use_gpu, resources,
    max_failures) and have ``checkpoint_every`` 0: each writes only its final model, and an
    interrupted sweep resumes run by run. ``sweep_dir`` holds the sweep's Ray Train record.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from . import batches
    from .layout import RunDir

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
    storage = str(Path(sweep_dir).resolve()) if len(todo) > 1 else todo[0][1]["config"]["output"]
    jobs = []
    for _, s in todo:
        run = RunDir(s["config"]["output"])
        data = batches.load(run.uri, [run.path("corpus", f) for f in s["data_stats"]["files"]],
                            s["data_stats"]["part_rows"])
        jobs.append({"cfg": s["config"], "plan": s["plan"], "deepspeed": s["deepspeed"], "data": data,
                     "output": s["config"]["output"]})
    use_gpu = todo[0][1]["use_gpu"]
    resources = {"CPU": first.cpus_per_worker} | ({"GPU": first.gpus_per_worker} if use_gpu else {})
    trainer = TorchTrainer(
        train_loop, train_loop_config={"jobs": jobs, "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=first.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=RUN_NAME, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=max(1, first.keep_checkpoints)),
                             failure_config=FailureConfig(max_failures=first.max_failures)))
    started = time.time()
    result = trainer.fit()
    seconds = round(time.time() - started, 2)
    for _, summary in todo:
        out = Path(summary["config"]["output"])
        if len(todo) > 1:
            state = json.loads((out / STATE_FILE).read_text())
            extra = {"train_seconds": state["seconds"], "sweep_seconds": seconds, "sweep_runs": len(todo)}
        else:
            if result.checkpoint is None:
                raise FinetuneError(f"the run in {out / RUN_NAME} reported no checkpoint")
            with result.checkpoint.filesystem.open_input_stream(
                    f"{result.checkpoint.path.rstrip('/')}/{STATE_FILE}") as f:
                state = json.loads(f.read().decode())
            _copy_model(result.checkpoint, out / "model")
            extra = {"train_seconds": seconds}
        _finish(summary, state, **extra)
        log(f"done: step {state['step']}, loss {summary['final_loss']:.4f}; model in {out / 'model'}")
    log(f"{len(todo)} run(s) fine-tuned in {seconds:.1f}s")
    return records


def _finish(summary: dict, state: dict, **extra) -> dict:
    """``summary`` completed from the trainer ``state`` (step, log) and written as finetune.json."""
    out = Path(summary["config"]["output"])
    steps = [e for e in state["log"] if "loss" in e]
    summary.update(status="done", model=str(out / "model"), final_step=state["step"],
                   final_loss=steps[-1]["loss"] if steps else None,
                   attempts=[e["step"] for e in state["log"] if e.get("event") == "start"], log=state["log"], **extra)
    _write_json(out / SUMMARY, summary)
    return summary
