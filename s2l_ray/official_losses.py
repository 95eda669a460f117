"""The official S2L code's trajectories as this run's: its ``losses.pt`` files imported, nothing scored.

Its ``get_trajectories.py`` writes one ``losses.pt`` per checkpoint (``checkpoint-N/losses.pt``, or
``hf_outputs/<model>_losses.pt``): with ``torch.save``, a list of one loss per example (0-d tensors) in the order
of the data file it read. Example ``i`` of that order is the ``i``-th record of this corpus's inputs in corpus
order (a JSON array's elements, a JSONL file's lines, a Parquet file's rows, file after file; the manifest's
``corpus.inputs`` counts them): every stored row takes its loss through its origin (input file, row), so rows
dropped or truncated here take nothing from the others. A NaN loss stays NaN (``cluster.nan_value`` replaces it,
as the official selection replaces it with 0). The confidence column is null: these files hold losses only.
"""
from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import ConfigError
from .layout import TRAJECTORY_SCHEMA, RunDir, resolve, write_parquet_atomic

LOSSES = "losses.pt"
CONFIDENCE_SCORES = ("confidence_mean", "confidence_std")  # the methods' scores read from the gold-token probability


def loss_files(paths: list[str]) -> list[tuple[int, str]]:
    """``(step, path)`` of each ``losses.pt`` in step order: the file, a checkpoint folder holding one, or a training
    output whose ``checkpoint-N`` folders hold one (by N)."""
    import posixpath

    from .models import own_checkpoints

    found = own_checkpoints(paths, LOSSES, "proxy.losses", files=True)
    return [(s, p if p.endswith(".pt") else posixpath.join(p, LOSSES)) for s, p in found]


def tokenizer_beside(path: str) -> str:
    """The folder of a ``losses.pt`` when it holds a tokenizer (the official checkpoints do), else ""."""
    import posixpath

    from .layout import exists

    folder = posixpath.dirname(path)
    fs, root = resolve(folder)
    return folder if exists(fs, posixpath.join(root, "tokenizer_config.json")) else ""


def read_losses(path: str) -> np.ndarray:
    """One ``losses.pt`` as float32 (a list of 0-d tensors or numbers, or a 1-d tensor), read without unpickling code."""
    import torch

    fs, p = resolve(path)
    try:
        with fs.open_input_file(p) as f:
            raw = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch.load raises on a file that is not one of these
        raise ConfigError(f"proxy.losses: {path} is not a readable losses.pt ({type(e).__name__}: {e})") from None
    try:
        values = raw.reshape(-1) if isinstance(raw, torch.Tensor) else torch.stack([torch.as_tensor(v).reshape(())
                                                                                    for v in raw])
    except (TypeError, RuntimeError) as e:
        raise ConfigError(f"proxy.losses: {path} holds {type(raw).__name__}, not one loss per example ({e})") from None
    return values.float().numpy()


def check_records(path: str, losses: np.ndarray, inputs: list[dict]) -> None:
    """Refuse a file whose example count is not the corpus inputs' record count."""
    if any("records" not in i for i in inputs):
        raise ConfigError("proxy.losses: the stored corpus does not count its inputs' records (stored by an earlier "
                          "version); use a new --output")
    total = sum(int(i["records"]) for i in inputs)
    if len(losses) != total:
        raise ConfigError(f"proxy.losses: {path} holds {len(losses):,} losses, the corpus inputs "
                          f"{total:,} records ({', '.join(i['uri'] for i in inputs)}); give the data file the official "
                          "code scored, as it was")


def import_point(run: RunDir, t: int, step: int, path: str) -> dict:
    """Trajectory point ``t`` of ``run`` from one ``losses.pt``: a part per corpus part, recorded as done."""
    start = time.time()
    losses = read_losses(path)
    manifest = run.read_manifest()
    inputs = manifest["corpus"]["inputs"]
    check_records(path, losses, inputs)
    first = np.cumsum([0] + [int(i["records"]) for i in inputs])[:-1]  # each input's first example
    files, taken = [], []
    for number, _, _, part in run.corpus_parts():
        rows = pq.read_table(part, filesystem=run.fs, columns=["idx", "id", "origin", "origin_row", "n_response"])
        at = first[rows.column("origin").to_numpy()] + rows.column("origin_row").to_numpy()
        n = rows.num_rows
        taken.append(losses[at])
        table = pa.table({"idx": rows.column("idx"), "id": rows.column("id"),
                          "checkpoint": pa.array(np.full(n, t, np.int32)), "step": pa.array(np.full(n, step, np.int64)),
                          "loss": pa.array(taken[-1]), "confidence": pa.nulls(n, pa.float32()),
                          "n_tokens": rows.column("n_response").cast(pa.int32())}, schema=TRAJECTORY_SCHEMA)
        files.append(run.trajectory_part(t, number))
        write_parquet_atomic(run.fs, files[-1], table)
    seconds = round(time.time() - start, 3)
    rec = {"step": step, "files": files, "rows": manifest["corpus"]["rows"], "seconds": seconds, "imported": path,
           "mean_loss": float(np.nanmean(np.concatenate(taken))), "corpus_fingerprint": manifest["corpus"]["fingerprint"]}
    run.mark_point_done(t, rec)
    return rec
