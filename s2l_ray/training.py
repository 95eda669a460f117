"""The one training loop, run by the proxy's Ray Train workers (plain PyTorch, DDP) and the target's (DeepSpeed).

The loop owns what both share: a worker's micro-batches in each epoch's seeded order (``batches``), the resume
position, collation (padded or packed), gradient accumulation, step accounting and each step's record. An engine
owns the rest: the forward pass, backward, and the optimizer step at each accumulation boundary.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import batches
from .text import training_batch


def steps_per_epoch(rows: int, workers: int, micro_batch_size: int, grad_accum: int) -> tuple[int, int, int]:
    """``(rows per worker, micro-batches per epoch, optimizer steps per epoch)``: each worker gets ``rows // workers``
    rows; trailing micro-batches that do not fill a step are skipped."""
    per_worker = rows // workers
    micro = math.ceil(per_worker / micro_batch_size)
    return per_worker, micro, micro // grad_accum


@dataclass(frozen=True)
class Loop:
    """What the loop runs: the epochs, the steps in each, and how the micro-batches are drawn and collated."""

    epochs: int
    steps_per_epoch: int
    micro_batch_size: int
    seed: int
    pad_id: int
    grad_accum: int = 1
    length_window: int = 1  # batches regrouped by length within runs of this many (1: the permutation's order)
    packed: bool = False


@dataclass(frozen=True)
class Step:
    """One optimizer step's record: its loss is this worker's mean over the step's micro-batches."""

    step: int
    epoch: int
    loss: float
    compute_seconds: float


class TorchEngine:
    """A plain PyTorch model (DDP-wrapped by Ray Train, or not): autocast, accumulation (no gradient all-reduce
    inside it), gradient clipping, the optimizer and the scheduler."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, device: torch.device, grad_accum: int,
                 grad_clip: float, amp: torch.dtype | None):
        self.model, self.optimizer, self.scheduler, self.device = model, optimizer, scheduler, device
        self.grad_accum, self.grad_clip, self.amp, self.micro = grad_accum, grad_clip, amp, 0

    def forward(self, batch: dict) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.model(**batch, use_cache=False).loss  # no cache: packed rows are told apart by position_ids

    def backward(self, loss: torch.Tensor) -> None:
        boundary = (self.micro + 1) % self.grad_accum == 0
        sync = contextlib.nullcontext() if boundary or not hasattr(self.model, "no_sync") else self.model.no_sync()
        with sync:
            (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.grad_accum:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class DeepSpeedEngine:
    """A DeepSpeed engine: it scales, accumulates, clips and steps as its config says."""

    def __init__(self, engine):
        self.engine, self.device = engine, engine.device

    def forward(self, batch: dict) -> torch.Tensor:
        return self.engine(**batch, use_cache=False).loss

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def lr(self) -> float:
        return self.engine.get_lr()[0]


def run(engine, data: batches.Data, loop: Loop, rank: int, world: int, step: int,
        on_step: Callable[[Step], None]) -> int:
    """Train from optimizer step ``step`` (a resumed run starts at the micro-batch its checkpoint was taken at) to
    the end; ``on_step`` sees every step's record after it (and may report, checkpoint or log). Returns the last
    step."""
    rows, spe, gas = batches.Rows(data), loop.steps_per_epoch, loop.grad_accum
    for epoch in range(step // spe, loop.epochs):
        skip, used = (step - epoch * spe) * gas, spe * gas
        positions = batches.epoch_positions(data.n, loop.seed, epoch, rank, world)
        micro = batches.iterate(rows, positions, loop.micro_batch_size, start=skip, windows=loop.length_window,
                                group_seed=(loop.seed, epoch, rank))
        acc, tick = 0.0, time.perf_counter()
        for i, (ids, spans) in enumerate(micro, start=skip):
            if i >= used:
                break
            batch = {k: v.to(engine.device) for k, v in training_batch(ids, spans, loop.pad_id, loop.packed).items()}
            loss = engine.forward(batch)
            engine.backward(loss)
            engine.step()
            acc += loss.item()
            if (i + 1) % gas:
                continue
            step += 1
            on_step(Step(step, epoch, acc / gas, time.perf_counter() - tick))
            acc, tick = 0.0, time.perf_counter()
        if step != (epoch + 1) * spe:
            raise RuntimeError(f"rank {rank} ended epoch {epoch} at step {step}, not at the planned {(epoch + 1) * spe}")
    return step
