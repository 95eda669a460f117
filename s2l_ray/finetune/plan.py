"""What a fine-tuning run will do: its step plan, its DeepSpeed config, and the key of its settings."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, FinetuneConfig, to_dict
from ..layout import stage_key
from ..models import resolve_bf16
from ..training import steps_per_epoch

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# The keys of the DeepSpeed JSON that FinetuneConfig owns: "auto" (or absent) is filled in; an
# explicit value must agree with the config.
_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
          "gradient_clipping", "bf16.enabled", "zero_optimization.stage")


class FinetuneError(ValueError):
    """Fine-tuning inputs or outputs are missing, inconsistent or unusable."""


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
    if min(cfg.workers.count, cfg.micro_batch_size, cfg.grad_accum, cfg.epochs, cfg.length_window) < 1:
        raise ConfigError("workers.count, micro_batch_size, grad_accum, epochs and length_window must all be at least 1")
    per_worker, micro, spe = steps_per_epoch(rows, cfg.workers.count, cfg.micro_batch_size, cfg.grad_accum)
    if spe == 0:
        raise FinetuneError(
            f"{rows} training rows make no optimizer step: each of the {cfg.workers.count} workers needs at least "
            f"grad_accum={cfg.grad_accum} micro-batches of micro_batch_size={cfg.micro_batch_size} rows")
    total = spe * cfg.epochs
    return Plan(rows, cfg.workers.count, per_worker, micro, spe, total, int(cfg.warmup_ratio * total))


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
              "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * cfg.workers.count,
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


def config_key(cfg: FinetuneConfig) -> str:
    """What a checkpoint depends on besides the data: training fields, model and tokenizer."""
    fields = to_dict(cfg)
    for perf in ("output", "checkpoint_every", "keep_checkpoints", "max_failures", "use_gpu", "workers", "tracking",
                 "packed"):  # packed: the same losses
        fields.pop(perf, None)
    fields["num_workers"] = cfg.workers.count  # the global batch and each worker's rows depend on it
    fields["corpus"].pop("path")
    return stage_key(fields)
