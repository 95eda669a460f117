"""Exact per-example loss and embeddings, batched: the core functions and the Ray Data job run per checkpoint.

An example's loss is the mean token cross-entropy over its response tokens, as if it were
scored alone: sequences are right-padded (a causal model's real tokens never attend to the
padding after them), labels on padding and prompt are ignored, and the reduction is per row.
Rows are grouped by length so that a forward pass wastes little on padding. An example's
embedding (for ``embedding-target``) is the mean over its tokens of the last layer's hidden states.
One actor pool scores the corpus and the target examples of a run together (``score_parts``).
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
from .layout import TRAJECTORY_SCHEMA, RunDir, embedding_schema, exists, remove_temporaries, write_parquet_atomic
from .progress import Progress
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
    """A local directory of a proxy checkpoint's ``model/`` only (or of the checkpoint itself when it is a model
    directory: the user's own checkpoints): the checkpoint's own folder on a local filesystem, else a temporary copy
    of just that folder (not the optimizer state beside it)."""
    import pyarrow.fs as pafs

    src = posixpath.join(checkpoint.path, "model")
    if not exists(checkpoint.filesystem, posixpath.join(src, "config.json")):
        src = checkpoint.path
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


@torch.inference_mode()
def example_embeddings(model: torch.nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-row mean over its real tokens of the last layer's hidden states (after the final norm, as the LM
    head sees them), float32 ``[rows, hidden]``. Rows must be right-padded: real tokens never attend to
    the padding after them."""
    hidden = model.base_model(input_ids=input_ids).last_hidden_state.float()
    mask = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]).float()
    return (hidden * mask[:, :, None]).sum(1) / lengths[:, None].float()


def embed_rows(model: torch.nn.Module, input_ids: list, pad_id: int, max_tokens: int, device: torch.device,
               autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """Mean-pooled last hidden states of rows (``text.encode`` ids) in length buckets, in input order."""
    out = None
    for bucket in length_buckets([len(x) for x in input_ids], max_tokens):
        rows = [input_ids[i] for i in bucket]
        b = collate(rows, rows, pad_id)
        lengths = b["attention_mask"].sum(1)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            e = example_embeddings(model, b["input_ids"].to(device), lengths.to(device)).cpu().numpy()
        if out is None:
            out = np.empty((len(input_ids), e.shape[1]), np.float32)
        out[bucket] = e
    return np.empty((0, 0), np.float32) if out is None else out


class PartScorer:
    """Ray Data actor: loads one checkpoint's model once; scores whole stored parts.

    Each call gets ``(run, part)`` pairs: the stored parts of one or more run directories (the corpus
    and the target examples, stored alike). ``kind`` ``loss`` writes trajectory point t's losses
    (``trajectories/checkpoint=t/part-<n>.parquet``); ``embedding`` the mean-pooled hidden states
    (``embeddings/part-<n>.parquet``). Files are written atomically under fixed names, so a retried
    call (after an actor died) rewrites the same file and no row is lost or duplicated. The stage
    decides the device and precision; the actor obeys.
    """

    def __init__(self, checkpoint: Any, kind: str, t: int, step: int, max_tokens: int, use_gpu: bool,
                 precision: str):
        from .models import load_model, resolve_bf16

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.autocast = torch.bfloat16 if resolve_bf16(precision, use_gpu) else None
        with model_weights(checkpoint) as d:
            self.model = load_model(d).to(self.device).eval()
        self.pad_id = self.model.config.pad_token_id or 0
        self.kind, self.t, self.step, self.max_tokens = kind, t, step, max_tokens

    def _table(self, src: pa.Table) -> pa.Table:
        ids = src.column("input_ids").to_pylist()
        n = src.num_rows
        if self.kind == "embedding":
            e = embed_rows(self.model, ids, self.pad_id, self.max_tokens, self.device, self.autocast)
            return pa.table({"idx": src.column("idx"), "id": src.column("id"),
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(e.ravel()), e.shape[1])},
                            schema=embedding_schema(e.shape[1]))
        out = score_rows(self.model, ids, src.column("spans").to_pylist(), self.pad_id, self.max_tokens,
                         self.device, self.autocast)
        return pa.table({
            "idx": src.column("idx"), "id": src.column("id"), "checkpoint": pa.array(np.full(n, self.t, np.int32)),
            "step": pa.array(np.full(n, self.step, np.int64)),
            "loss": out["loss"], "confidence": out["confidence"], "n_tokens": out["n_tokens"]},
            schema=TRAJECTORY_SCHEMA)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, seconds, sums = [], [], []
        for uri, part in zip(batch["run"], batch["part"]):
            run = RunDir(str(uri))
            src = pq.read_table(run.corpus_part(int(part)), filesystem=run.fs,
                                columns=["idx", "id", "input_ids", "spans"], partitioning=None)
            tick = time.perf_counter()
            table = self._table(src)
            seconds.append(time.perf_counter() - tick)
            dest = run.embedding_part(int(part)) if self.kind == "embedding" else run.trajectory_part(self.t, int(part))
            write_parquet_atomic(run.fs, dest, table)
            rows.append(src.num_rows)
            sums.append(float(np.nansum(table.column("loss").to_numpy())) if self.kind == "loss" else 0.0)
        return {"run": batch["run"], "part": batch["part"], "rows": np.asarray(rows, np.int64),
                "seconds": np.asarray(seconds), "loss_sum": np.asarray(sums)}


def score_parts(runs: list[RunDir], kind: str, checkpoint: Any, cfg: ScoringConfig, use_gpu: bool, precision: str,
                t: int = 0, step: int = 0) -> dict[str, dict]:
    """Score every stored part of ``runs`` with one checkpoint in one Ray Data actor pool; per run URI, the
    files written, rows and compute seconds. Each run's output folder is cleared first, so nothing an
    interrupted attempt left there is mixed in, and checked whole at the end (every part, every row)."""
    import ray.data

    folders = {r.uri: r.trajectory_dir(t) if kind == "loss" else r.path("embeddings") for r in runs}
    for r in runs:
        if exists(r.fs, folders[r.uri]):
            r.fs.delete_dir(folders[r.uri])
    items = [{"run": r.uri, "part": p[0]} for r in runs for p in r.corpus_parts()]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        PartScorer, fn_constructor_args=(checkpoint, kind, t, step, cfg.max_tokens, use_gpu, precision), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(cfg.actors.count, len(items))),
        num_cpus=cfg.actors.cpus, num_gpus=cfg.actors.gpus if use_gpu else 0,
        resources=parse_resources(cfg.actors.resources, "scoring.actors.resources") or None)
    done: list[dict] = []
    progress = Progress(len(items), "parts", "scoring", lambda d: f"{kind}, point {t}")
    for row in ds.iter_rows():
        done.append(row)
        progress(done)
    out = {}
    for r in runs:
        mine = [d for d in done if d["run"] == r.uri]
        remove_temporaries(r.fs, folders[r.uri])  # left by an actor killed while writing; the retry rewrote it
        parts = [p[0] for p in r.corpus_parts()]
        rows, expected = sum(int(d["rows"]) for d in mine), r.read_manifest()["corpus"]["rows"]
        if sorted(int(d["part"]) for d in mine) != parts or rows != expected:
            raise RuntimeError(f"{kind} of {r.uri} at point {t}: {rows} rows in parts "
                               f"{sorted(int(d['part']) for d in mine)}, expected {expected} rows in {len(parts)} parts")
        files = [r.trajectory_part(t, p) if kind == "loss" else r.embedding_part(p) for p in parts]
        out[r.uri] = {"files": files, "rows": rows, "compute_seconds": round(float(sum(d["seconds"] for d in mine)), 3),
                      "mean_loss": float(sum(d["loss_sum"] for d in mine)) / rows}
    return out


def score_point(runs: list[str], t: int, step: int, checkpoint: Any, cfg: ScoringConfig, use_gpu: bool,
                precision: str) -> dict:
    """Score the stored rows of ``runs`` (the corpus, and the target examples when given) with one checkpoint
    into each run's ``trajectories/checkpoint=t/``; each run records the point as done once all its parts are."""
    start = time.time()
    dirs = [RunDir(u) for u in runs]
    scored = score_parts(dirs, "loss", checkpoint, cfg, use_gpu, precision, t, step)
    seconds = round(time.time() - start, 3)
    for r in dirs:
        rec = scored[r.uri]
        r.mark_point_done(t, {"step": step, **rec, "seconds": seconds,
                              "corpus_fingerprint": r.read_manifest()["corpus"]["fingerprint"]})
    return {"t": t, "step": step, "seconds": seconds, "rows": sum(v["rows"] for v in scored.values()),
            "compute_seconds": round(sum(v["compute_seconds"] for v in scored.values()), 3)}


def reference_losses(model: torch.nn.Module, tokenizer: Any, rows: list[dict], text: Any) -> np.ndarray:
    """One example at a time (the official S2L loop): encode it alone, forward with labels, take the loss.

    ``rows`` are normalised corpus rows (``corpus.normalise``); ``text`` is the ``TextConfig``.
    """
    from .corpus import tokenize
    from .text import chat_template

    chat = chat_template(tokenizer, text.chat_template)
    out = np.empty(len(rows), np.float32)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i, r in enumerate(rows):
            enc = tokenize(tokenizer, chat, [r], text, [f"row {i}"])
            ids = enc["input_ids"][0]
            labels = torch.tensor([labels_from(ids, enc["spans"][0])], device=device)
            out[i] = model(input_ids=torch.tensor([ids], device=device), labels=labels).loss.item()
    return out
