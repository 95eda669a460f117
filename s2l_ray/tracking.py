"""Experiment tracking: each job's run in MLflow or W&B, opened through Ray's integrations (``setup_mlflow``,
``setup_wandb``).

``tracking.backend``: ``none`` | ``mlflow`` | ``wandb``. One process logs a job: the driver for a selection (once
its stages are done: the proxy's loss curve, each trajectory point's scoring rate, the cluster sizes, the budget per
source and per cluster, the cost of each stage, and the selection files as artifacts) and for an evaluation (its
metrics), the Train worker of rank 0 for a fine-tuning run (its loss and learning rate at every step, as they come).
MLflow reads the server from ``tracking.uri`` (else ``MLFLOW_TRACKING_URI``); W&B its mode from ``WANDB_MODE``
(``offline``: nothing leaves the machine) and writes under ``tracking.uri`` when given.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import re
import tempfile
from collections import Counter
from typing import Any, Iterator

import pyarrow.parquet as pq

from .config import ConfigError, TrackingConfig
from .layout import RunDir, exists

BACKENDS = {"none": None, "mlflow": "mlflow", "wandb": "wandb"}  # backend: the package it needs


def check(cfg: TrackingConfig) -> None:
    """Refuse an unknown backend, or one whose package is not installed, before any work."""
    import importlib.util

    if cfg.backend not in BACKENDS:
        raise ConfigError(f"tracking.backend must be one of {list(BACKENDS)}, not {cfg.backend!r}")
    package = BACKENDS[cfg.backend]
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"tracking.backend={cfg.backend}: the {package} package is not installed "
                          "(pip install 's2l-ray[tracking]')")


def environment() -> dict[str, str]:
    """The driver's MLflow and W&B settings (``MLFLOW_*``, ``WANDB_*``), for the worker that logs a fine-tuning run."""
    return {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "WANDB_"))}


def run_name(cfg: TrackingConfig, output: str) -> str:
    """``tracking.run_name``, else the name of the job's output folder."""
    return cfg.run_name or posixpath.basename(output.rstrip("/"))


class Tracker:
    """One tracked run: params at the start, then metrics (with their step) and files. ``backend: none`` does
    nothing."""

    def __init__(self, cfg: TrackingConfig, name: str, params: dict):
        self.backend, self.axes = cfg.backend, set()
        flat = _flatten(params)
        if self.backend == "mlflow":
            from ray.air.integrations.mlflow import setup_mlflow

            # rank_zero_only=False: the caller is the one process that logs this job (driver or rank 0)
            self.client = setup_mlflow(flat, tracking_uri=cfg.uri or None, experiment_name=cfg.project,
                                       run_name=name, create_experiment_if_not_exists=True, rank_zero_only=False)
        elif self.backend == "wandb":
            from ray.air.integrations.wandb import setup_wandb

            if cfg.uri:
                os.makedirs(cfg.uri, exist_ok=True)
            self.client = setup_wandb(flat, project=cfg.project, name=name, dir=cfg.uri or None,
                                      rank_zero_only=False)

    def metrics(self, values: dict[str, float], step: int | None = None, axis: str = "") -> None:
        """Log ``values`` at ``step`` of their x-axis: ``axis``, else the training step of their family (the name's
        first part: ``proxy/step`` for ``proxy/train_loss``). W&B keeps one step counter per run that only goes up,
        so there each axis is a metric of its own (``define_metric``)."""
        values = {metric_name(k): float(v) for k, v in values.items() if v is not None}
        if self.backend == "mlflow":
            self.client.log_metrics(values, step=step)
        elif self.backend == "wandb":
            if step is None:
                self.client.log(values)
                return
            for key in values:
                x = axis or f"{key.split('/')[0]}/step"
                if (key, x) not in self.axes:
                    self.client.define_metric(key, step_metric=x)
                    self.axes.add((key, x))
                self.client.log({key: values[key], x: step})

    def series(self, name: str, values: list[float], steps: list[int] | None = None, axis: str = "") -> None:
        """A metric over steps (the loss curve) or over indices (a distribution: one value per cluster)."""
        for i, v in zip(steps if steps is not None else range(len(values)), values):
            self.metrics({name: v}, step=i, axis=axis)

    def files(self, folder: str, fs, paths: list[str]) -> None:
        """Log files of filesystem ``fs`` (a run directory's: local or an object store) as artifacts under
        ``folder``."""
        if self.backend == "none":
            return
        with tempfile.TemporaryDirectory() as tmp:
            # W&B links to the files it is given: they are copied into its run's own folder, not a temporary one
            root = self.client.dir if self.backend == "wandb" else tmp
            os.makedirs(os.path.join(root, folder), exist_ok=True)
            for path in paths:
                local = os.path.join(root, folder, posixpath.basename(path))
                with fs.open_input_stream(path) as src, open(local, "wb") as dst:
                    dst.write(src.read())
                if self.backend == "mlflow":
                    self.client.log_artifact(local, artifact_path=folder)
                else:
                    self.client.save(local, base_path=root, policy="now")

    def close(self, ok: bool) -> None:
        if self.backend == "mlflow":
            self.client.end_run(status="FINISHED" if ok else "FAILED")
        elif self.backend == "wandb":
            self.client.finish(exit_code=0 if ok else 1)


@contextlib.contextmanager
def tracked(cfg: TrackingConfig, name: str, params: dict) -> Iterator[Tracker]:
    """A tracked run for the body of the ``with``: ended as finished, or as failed when the body raises."""
    tracker = Tracker(cfg, name, params)
    try:
        yield tracker
    except BaseException:
        tracker.close(ok=False)
        raise
    tracker.close(ok=True)


def metric_name(name: str) -> str:
    """``name`` with only the characters MLflow allows in a metric's name (``corpus (tokenisation)``: ``corpus
    tokenisation``)."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "", name)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def log_selection(tracker: Tracker, run: RunDir) -> None:
    """What a finished selection run records, from its manifest and indexes."""
    m = run.read_manifest()
    proxy = m.get("proxy", {})
    for _, rec in sorted(run.proxy_checkpoints().items()):  # each point's losses: the steps since the one before
        losses = rec.get("losses") or []
        tracker.series("proxy/train_loss", losses, list(range(rec["step"] - len(losses) + 1, rec["step"] + 1)))
    for rec in proxy.get("scored", []):
        tracker.metrics({"scoring/rows_per_second": rec["rows"] / max(rec["seconds"], 1e-9),
                         "scoring/seconds": rec["seconds"]}, step=rec["step"], axis="proxy/step")
    if clusters := m.get("clusters"):
        sizes = sorted(clusters["cluster_sizes"])
        tracker.series("clusters/size", sizes, axis="clusters/rank")  # smallest first
        tracker.metrics({"clusters/k": clusters["k"], "clusters/size_min": sizes[0], "clusters/size_max": sizes[-1]})
    files = [run.manifest] + [run.path(f) for f in ("report.html", "report.png", "dataset_info.json")
                              if exists(run.fs, run.path(f))]
    several = len(m["selection"]["budgets"]) > 1
    for budget, rec in m["selection"]["budgets"].items():
        tracker.metrics({f"selection/{budget}/selected": rec["selected"]}
                        | {f"selection/{budget}/source/{s}": n for s, n in rec["sources"].items()})
        b = int(budget) if several else None
        table = run.selection(b)
        if clusters:
            per_cluster = Counter(pq.read_table(table, filesystem=run.fs, columns=["cluster"])
                                  .column("cluster").to_pylist())
            tracker.series(f"selection/{budget}/selected_per_cluster", [per_cluster[c] for c in range(len(sizes))],
                           axis="selection/cluster")
        files += [table] + [run.selected_as(b, s) for s in ("jsonl", "original.jsonl", "original.parquet",
                                                             "trl.parquet") if exists(run.fs, run.selected_as(b, s))]
    stages = {f"cost/{name}_seconds": rec["seconds"] for name, rec in m.get("stages", {}).items()}
    tracker.metrics(stages | {"cost/total_seconds": m.get("total_seconds"),
                              "cost/proxy_train_compute_seconds": proxy.get("train_compute_seconds"),
                              "cost/score_compute_seconds": proxy.get("score_compute_seconds")})
    tracker.files("selection", run.fs, files)


def log_benchmark(tracker: Tracker, results: dict, out: RunDir) -> None:
    """A benchmark's results: each (method, budget)'s mean accuracy and loss per evaluation set, the paired
    comparisons, the cost ledger, and the result files as artifacts."""
    for row in results["summary"]:
        for name, e in row["evals"].items():
            tracker.metrics({f"benchmark/{name}/{row['method']}/{row['budget']}/{k}": e[k]
                             for k in ("accuracy", "accuracy_std", "loss", "loss_std")})
    for c in results["comparisons"]:  # one series per method, budget and baseline: none overwrites another
        tracker.metrics({f"comparison/{c['eval']}/{c['method']}/{c['budget']}/vs {c['baseline']}/{c['metric']}/{k}":
                         c[k] for k in ("mean", "low", "high")})
    cost = results["cost"]
    unit = cost["unit"].replace("-", "_")
    tracker.metrics({f"cost/selection/{k}/{unit}": v for k, v in cost["selection"].items()}
                    | {f"cost/finetune_mean/{k}/{unit}": v for k, v in cost["finetune_mean"].items()}
                    | {f"cost/selection_total/{unit}": cost["selection_total"],
                       "cost/selection_to_full_finetune": cost["selection_to_full_finetune"]})
    tracker.files("benchmark", out.fs, [out.path(f) for f in ("results.json", "results.md", "results.html",
                                                              "results.png")])
