"""Exact per-example loss, batched: the core function and the Ray Data job run per checkpoint.

An example's loss is the mean token cross-entropy over its response tokens, as if it were
scored alone: sequences are right-padded (a causal model's real tokens never attend to the
padding after them), labels on padding and prompt are ignored, and the reduction is per row.
Rows are grouped by length so that a forward pass wastes little on padding.
"""
from __future__ import annotations

import contextlib
import posixpath
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from .config import ScoringConfig, parse_resources
from .layout import TRAJECTORY_SCHEMA, RunDir, exists, remove_temporaries, write_parquet_atomic
from .text import IGNORE_INDEX, collate, labels_from, length_buckets


# Config fields of causal LMs whose forward transforms the LM head's output (soft-capping or
# scaling): for those the full forward is used instead of the response-only head below.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")


def _response_logits(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at the positions that predict response tokens only, ``[mask.sum(), vocab]``.

    The LM head and the softmax run on response positions alone (often a third of the
    tokens) when the model's forward is base model + linear head, as for GPT-NeoX and Llama.
    No attention mask: rows are right-padded, so a real token only ever attends to real tokens
    before it, and the model takes its faster unmasked causal attention path.
    """
    head = model.get_output_embeddings()
    if head is None or any(getattr(model.config, f, None) for f in _LOGIT_TRANSFORMS):
        return model(input_ids=input_ids).logits[:, :-1][mask]
    hidden = model.base_model(input_ids=input_ids).last_hidden_state
    return head(hidden[:, :-1][mask])


@torch.inference_mode()
def example_losses(model: torch.nn.Module, input_ids: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row mean response cross-entropy, mean gold-token probability and response-token count.

    Rows must be right-padded (``text.collate``), padding labelled IGNORE_INDEX.
    Rows with no response token get NaN loss and confidence.
    """
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    ce = F.cross_entropy(_response_logits(model, input_ids, mask).float(), target[mask],
                         reduction="none")
    row = mask.nonzero()[:, 0]
    n = mask.sum(1)
    zeros = torch.zeros(len(n), dtype=torch.float32, device=ce.device)
    loss = zeros.index_add(0, row, ce) / n
    conf = zeros.index_add(0, row, torch.exp(-ce)) / n
    return loss, conf, n


def score_rows(model: torch.nn.Module, input_ids: list, spans: list[list[int]], pad_id: int, max_tokens: int,
               device: torch.device, autocast_dtype: torch.dtype | None = None) -> dict[str, np.ndarray]:
    """Score rows (token ids + label spans, ``text.encode``) in length buckets; outputs follow the input order."""
    n = len(input_ids)
    loss = np.empty(n, np.float32)
    conf = np.empty(n, np.float32)
    count = np.empty(n, np.int32)
    for bucket in length_buckets([len(x) for x in input_ids], max_tokens):
        b = collate([input_ids[i] for i in bucket], [labels_from(input_ids[i], spans[i]) for i in bucket], pad_id)
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            lo, co, nt = example_losses(model, b["input_ids"], b["labels"])
        loss[bucket], conf[bucket], count[bucket] = lo.cpu().numpy(), co.cpu().numpy(), nt.cpu().numpy()
    return {"loss": loss, "confidence": conf, "n_tokens": count}


@contextlib.contextmanager
def model_weights(checkpoint: Any):
    """A local directory of a proxy checkpoint's ``model/`` only: the checkpoint's own folder on a local
    filesystem, else a temporary copy of just that subfolder (not the optimizer state beside it)."""
    import pyarrow.fs as pafs

    src = posixpath.join(checkpoint.path, "model")
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield src
        return
    tmp = tempfile.mkdtemp(prefix="s2l-model-")
    try:
        pafs.copy_files(src, tmp, source_filesystem=checkpoint.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class LossScorer:
    """Ray Data actor: loads one checkpoint's model once; scores whole corpus parts.

    Each call gets corpus part numbers, scores each part in length-bucketed batches and writes
    ``trajectories/checkpoint=t/part-<n>.parquet`` atomically, so a retried call (after an
    actor died) rewrites the same file and no row is lost or duplicated.
    """

    def __init__(self, run_uri: str, checkpoint: Any, t: int, step: int, max_tokens: int, precision: str):
        from .models import load_model, resolve_bf16

        use_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.autocast = torch.bfloat16 if resolve_bf16(precision, use_gpu) else None
        with model_weights(checkpoint) as d:
            self.model = load_model(d).to(self.device).eval()
        self.pad_id = self.model.config.pad_token_id or 0
        self.run, self.t, self.step, self.max_tokens = RunDir(run_uri), t, step, max_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, seconds = [], []
        for part in batch["part"]:
            src = pq.read_table(self.run.corpus_part(int(part)), filesystem=self.run.fs,
                                columns=["idx", "id", "input_ids", "spans"], partitioning=None)
            tick = time.perf_counter()
            out = score_rows(self.model, src.column("input_ids").to_pylist(), src.column("spans").to_pylist(),
                             self.pad_id, self.max_tokens, self.device, self.autocast)
            seconds.append(time.perf_counter() - tick)
            n = src.num_rows
            table = pa.table({
                "idx": src.column("idx"), "id": src.column("id"),
                "checkpoint": pa.array(np.full(n, self.t, np.int32)),
                "step": pa.array(np.full(n, self.step, np.int64)),
                "loss": out["loss"], "confidence": out["confidence"], "n_tokens": out["n_tokens"],
            }, schema=TRAJECTORY_SCHEMA)
            write_parquet_atomic(self.run.fs, self.run.trajectory_part(self.t, int(part)), table)
            rows.append(n)
        return {"part": batch["part"], "rows": np.asarray(rows, np.int64), "seconds": np.asarray(seconds)}


def score_point(run_uri: str, t: int, step: int, checkpoint: Any, cfg: ScoringConfig, use_gpu: bool,
                precision: str, expected_rows: int) -> dict:
    """Score the whole stored corpus with one checkpoint into ``trajectories/checkpoint=t/``.

    A Ray Data actor pool maps over the corpus parts; anything an interrupted attempt left in
    that folder is removed first, and the point is recorded as done only once every part is.
    """
    import ray.data

    run = RunDir(run_uri)
    start = time.time()
    out_dir = run.trajectory_dir(t)
    if exists(run.fs, out_dir):
        run.fs.delete_dir(out_dir)
    parts = list(range(len(run.corpus_files())))
    done = ray.data.from_items([{"part": p} for p in parts], override_num_blocks=len(parts)).map_batches(
        LossScorer, fn_constructor_args=(run.uri, checkpoint, t, step, cfg.max_tokens, precision), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(cfg.num_actors, len(parts))),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor if use_gpu else 0,
        resources=parse_resources(cfg.resources, "scoring.resources") or None).take_all()
    rows = sum(int(d["rows"]) for d in done)
    remove_temporaries(run.fs, out_dir)  # left by an actor killed while writing a part; the retry rewrote it
    if sorted(int(d["part"]) for d in done) != parts or rows != expected_rows:
        raise RuntimeError(f"trajectory point {t}: scored {rows} rows in parts {sorted(d['part'] for d in done)}, "
                           f"expected {expected_rows} rows in {len(parts)} parts")
    record = {"step": step, "files": [run.trajectory_part(t, p) for p in parts], "rows": rows,
              "seconds": round(time.time() - start, 3),
              "compute_seconds": round(float(sum(d["seconds"] for d in done)), 3),
              "corpus_fingerprint": run.read_manifest()["corpus"]["fingerprint"]}
    run.mark_point_done(t, record)
    return {"t": t, **record}


def reference_losses(model: torch.nn.Module, tokenizer: Any, rows: list[dict], text: Any) -> np.ndarray:
    """One example at a time (the official S2L loop): encode it alone, forward with labels, take the loss.

    ``rows`` are normalised corpus rows (``corpus.normalise``); ``text`` is the ``TextConfig``.
    """
    from .corpus import tokenize
    from .text import chat_template

    chat = chat_template(tokenizer, text.chat_template)
    out = np.empty(len(rows), np.float32)
    with torch.inference_mode():
        for i, r in enumerate(rows):
            enc = tokenize(tokenizer, chat, [r], text, [f"row {i}"])
            ids = enc["input_ids"][0]
            labels = torch.tensor([labels_from(ids, enc["spans"][0])])
            out[i] = model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
    return out
