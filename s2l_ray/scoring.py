"""Exact per-example loss and embeddings, batched: the core functions and the Ray Data job run per checkpoint.

An example's loss is the mean token cross-entropy over its response tokens, as if it were
scored alone: sequences are right-padded (a causal model's real tokens never attend to the
padding after them), labels on padding and prompt are ignored, and the reduction is per row.
Rows are grouped by length so that a forward pass wastes little on padding. An example's
embedding (for ``embedding-target``) is the mean over its tokens of the last layer's hidden states.
One Ray Data job scores every trajectory point of a run, the corpus and the target examples together
(``score_points``): its actors start once and swap the model from one point to the next.
"""
from __future__ import annotations

import contextlib
import posixpath
import shutil
import tempfile
import time
from collections import Counter
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
    """Ray Data actor: scores whole stored parts, each with the checkpoint its row names; the model in memory is
    kept from one row to the next and swapped when a row names another checkpoint (the next trajectory point).

    Each row is ``(run, part, t, step, checkpoint)``: a stored part of a run directory (the corpus or the target
    examples, stored alike). ``kind`` ``loss`` writes trajectory point t's losses
    (``trajectories/checkpoint=t/part-<n>.parquet``); ``embedding`` the mean-pooled hidden states
    (``embeddings/part-<n>.parquet``). Files are written atomically under fixed names, so a retried
    call (after an actor died) rewrites the same file and no row is lost or duplicated. The stage
    decides the device and precision; the actor obeys.
    """

    def __init__(self, kind: str, max_tokens: int, use_gpu: bool, precision: str):
        from .models import resolve_bf16

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.autocast = torch.bfloat16 if resolve_bf16(precision, use_gpu) else None
        self.kind, self.max_tokens = kind, max_tokens
        self.model, self.loaded = None, None

    def _load(self, checkpoint: Any) -> None:
        from .models import load_model

        if self.loaded == checkpoint.path:
            return
        self.model = None  # the previous point's weights go before the next ones arrive
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        with model_weights(checkpoint) as d:
            self.model = load_model(d).to(self.device).eval()
        self.pad_id = self.model.config.pad_token_id or 0
        self.loaded = checkpoint.path

    def _table(self, src: pa.Table, t: int, step: int) -> pa.Table:
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
            "idx": src.column("idx"), "id": src.column("id"), "checkpoint": pa.array(np.full(n, t, np.int32)),
            "step": pa.array(np.full(n, step, np.int64)),
            "loss": out["loss"], "confidence": out["confidence"], "n_tokens": out["n_tokens"]},
            schema=TRAJECTORY_SCHEMA)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, seconds, sums = [], [], []
        for uri, part, t, step, checkpoint in zip(batch["run"], batch["part"], batch["t"], batch["step"],
                                                  batch["checkpoint"]):
            run, part, t = RunDir(str(uri)), int(part), int(t)
            self._load(checkpoint)
            src = pq.read_table(run.corpus_part(part), filesystem=run.fs,
                                columns=["idx", "id", "input_ids", "spans"], partitioning=None)
            tick = time.perf_counter()
            table = self._table(src, t, int(step))
            seconds.append(time.perf_counter() - tick)
            dest = run.embedding_part(part) if self.kind == "embedding" else run.trajectory_part(t, part)
            write_parquet_atomic(run.fs, dest, table)
            rows.append(src.num_rows)
            sums.append(float(np.nansum(table.column("loss").to_numpy())) if self.kind == "loss" else 0.0)
        return {"run": batch["run"], "part": batch["part"], "t": batch["t"], "step": batch["step"],
                "ready": batch["ready"], "rows": np.asarray(rows, np.int64), "seconds": np.asarray(seconds),
                "loss_sum": np.asarray(sums)}


def _output_dir(run: RunDir, kind: str, t: int) -> str:
    return run.trajectory_dir(t) if kind == "loss" else run.path("embeddings")


def _clear(runs: list[RunDir], kind: str, t: int) -> None:
    """Empty each run's output folder of point ``t``, so nothing an interrupted attempt left there is mixed in."""
    for r in runs:
        if exists(r.fs, folder := _output_dir(r, kind, t)):
            r.fs.delete_dir(folder)


def _items(runs: list[RunDir], t: int, step: int, checkpoint: Any, ready: float) -> list[dict]:
    return [{"run": r.uri, "part": p[0], "t": t, "step": step, "checkpoint": checkpoint, "ready": ready}
            for r in runs for p in r.corpus_parts()]


def _scored(run: RunDir, kind: str, t: int, mine: list[dict], corpus: dict) -> dict:
    """One run's record of a finished point (or of its embeddings), checked whole: every part, every row.
    ``corpus`` is the run's corpus record (its manifest's, read once by the caller)."""
    remove_temporaries(run.fs, _output_dir(run, kind, t))  # left by an actor killed while writing; the retry rewrote it
    parts = [p[0] for p in run.corpus_parts(corpus)]
    rows, expected = sum(int(d["rows"]) for d in mine), corpus["rows"]
    got = sorted(int(d["part"]) for d in mine)
    if got != parts or rows != expected:
        raise RuntimeError(f"{kind} of {run.uri} at point {t}: {rows} rows in parts {got}, "
                           f"expected {expected} rows in {len(parts)} parts")
    files = [run.trajectory_part(t, p) if kind == "loss" else run.embedding_part(p) for p in parts]
    return {"files": files, "rows": rows, "compute_seconds": round(float(sum(d["seconds"] for d in mine)), 3),
            "mean_loss": float(sum(d["loss_sum"] for d in mine)) / rows}


def _raise_own_errors() -> None:
    """A scorer's error reaches the caller as itself (``IsADirectoryError: ...``), not as Ray Data's wrapping."""
    import ray.data

    ray.data.DataContext.get_current().raise_original_map_exception = True


def _scorer(ds, cfg: ScoringConfig, kind: str, use_gpu: bool, precision: str, parts: int):
    import ray.data

    return ds.map_batches(
        PartScorer, fn_constructor_args=(kind, cfg.max_tokens, use_gpu, precision), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(cfg.actors.count, parts)),
        num_cpus=cfg.actors.cpus, num_gpus=cfg.actors.gpus if use_gpu else 0,
        resources=parse_resources(cfg.actors.resources, "scoring.actors.resources") or None)


def score_parts(runs: list[RunDir], kind: str, checkpoint: Any, cfg: ScoringConfig, use_gpu: bool,
                precision: str) -> dict[str, dict]:
    """Score every stored part of ``runs`` with one checkpoint in one Ray Data actor pool (the embeddings); per run
    URI, the files written, rows and compute seconds."""
    import ray.data

    _raise_own_errors()
    _clear(runs, kind, 0)
    items = _items(runs, 0, 0, checkpoint, time.time())
    ds = _scorer(ray.data.from_items(items, override_num_blocks=len(items)), cfg, kind, use_gpu, precision,
                 len(items))
    done: list[dict] = []
    progress = Progress(len(items), "parts", "scoring", lambda d: kind)
    for row in ds.iter_rows():
        done.append(row)
        progress(done)
    return {r.uri: _scored(r, kind, 0, [d for d in done if d["run"] == r.uri], r.read_manifest()["corpus"])
            for r in runs}


def _gate(row: dict, source: Any, todo: dict[int, list[str]]) -> dict:
    """Ray Data step before the scorers, one stored part at a time in order: waits until point ``t``'s checkpoint
    is persisted (``source.checkpoint``, an actor method); at the point's first part, empties its folders."""
    import ray

    t = int(row["t"])
    step, checkpoint, ready = ray.get(source.checkpoint.remote(t))
    if row["first"]:
        _clear([RunDir(u) for u in todo[t]], "loss", t)
    return {**row, "step": step, "checkpoint": checkpoint, "ready": ready}


def score_points(todo: dict[int, list[str]], source: Any, cfg: ScoringConfig, use_gpu: bool, precision: str,
                 on_point) -> None:
    """Score trajectory points ``t`` (in order) of the runs ``todo[t]`` (URIs: the corpus, and the target examples
    when given) in ONE Ray Data job: its actors start once and swap the model per point. Each point waits for its
    checkpoint (``source.checkpoint(t)`` returns ``(step, Checkpoint, ready time)``, blocking until it is
    persisted); once all its parts are scored, each run records the point as done and ``on_point(record)`` is
    called."""
    import ray.data

    _raise_own_errors()
    points = sorted(todo)
    corpora = {u: RunDir(u).read_manifest()["corpus"] for u in {u for t in points for u in todo[t]}}  # read once
    items = [{"run": u, "part": p[0], "t": t} for t in points for u in todo[t]
             for p in RunDir(u).corpus_parts(corpora[u])]
    for i, item in enumerate(items):
        item["first"] = i == 0 or items[i - 1]["t"] != item["t"]
    parts = Counter(item["t"] for item in items)
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
        _gate, fn_args=(source, todo), num_cpus=0, concurrency=1)
    ds = _scorer(ds, cfg, "loss", use_gpu, precision, max(parts.values()))
    done: dict[int, list[dict]] = {t: [] for t in points}
    progress: dict[int, Progress] = {}  # each from its point's first scored part
    for row in ds.iter_rows():
        t = int(row["t"])
        done[t].append(row)
        progress.setdefault(t, Progress(parts[t], "parts", "scoring", lambda d, t=t: f"point {t}"))(done[t])
        if len(done[t]) < parts[t]:
            continue
        step, seconds = int(row["step"]), round(time.time() - float(row["ready"]), 3)
        records = {}
        for r in (RunDir(u) for u in todo[t]):
            records[r.uri] = _scored(r, "loss", t, [d for d in done[t] if d["run"] == r.uri], corpora[r.uri])
            r.mark_point_done(t, {"step": step, **records[r.uri], "seconds": seconds,
                                  "corpus_fingerprint": corpora[r.uri]["fingerprint"]})
        on_point({"t": t, "step": step, "seconds": seconds, "rows": sum(v["rows"] for v in records.values()),
                  "compute_seconds": round(sum(v["compute_seconds"] for v in records.values()), 3),
                  "runs": todo[t]})


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
