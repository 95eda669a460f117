"""Experiment tracking through Ray's MLflow and W&B integrations, read back from what each wrote on this machine:
MLflow's local file store (``MLFLOW_ALLOW_FILE_STORE``) and W&B's offline run files (``WANDB_MODE=offline``). The
tracked selection is the session's (conftest's ``tracked_selection``)."""
from __future__ import annotations

import glob
import json
import os
from collections import Counter

import pyarrow.parquet as pq
import pytest

from helpers import wandb_history, wandb_records
from s2l_ray import evaluate, finetune
from s2l_ray.config import ConfigError, CorpusConfig, EvaluateConfig, FinetuneConfig, TextConfig, TrackingConfig
from s2l_ray.layout import RunDir
from s2l_ray.tracking import check


def mlflow_run(store: str, project: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name(project).experiment_id],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def history(client, run, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))


def same_series(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    return [s for s, _ in got] == [s for s, _ in expected] and \
        [v for _, v in got] == pytest.approx([v for _, v in expected])


def proxy_curve(run: RunDir) -> list[tuple[int, float]]:
    """The proxy's loss at every training step, as the checkpoint index records it point by point."""
    expected = []
    for _, rec in sorted(run.proxy_checkpoints().items()):
        expected += list(zip(range(rec["step"] - len(rec["losses"]) + 1, rec["step"] + 1), rec["losses"]))
    return expected


def test_a_selection_run_is_tracked_in_mlflow(tracked_selection, tmp_path):
    cfg, manifest, store = tracked_selection
    run = RunDir(cfg.output)
    client, tracked = mlflow_run(store, "tests", "selection")
    assert tracked.info.status == "FINISHED" and tracked.data.params["proxy.lr"] == "0.003"
    expected = proxy_curve(run)
    assert [s for s, _ in expected] == list(range(1, manifest["proxy"]["plan"]["total_steps"] + 1))
    assert same_series(history(client, tracked, "proxy/train_loss"), expected)
    assert same_series(history(client, tracked, "scoring/rows_per_second"),
                       [(r["step"], r["rows"] / r["seconds"]) for r in manifest["proxy"]["scored"]])
    sizes = sorted(manifest["clusters"]["cluster_sizes"])
    assert [v for _, v in history(client, tracked, "clusters/size")] == sizes
    budget = manifest["selection"]["budgets"]["12"]
    metrics = tracked.data.metrics
    assert {s: metrics[f"selection/12/source/{s}"] for s in budget["sources"]} == budget["sources"]
    per_cluster = Counter(pq.read_table(run.selection(), columns=["cluster"]).column("cluster").to_pylist())
    assert history(client, tracked, "selection/12/selected_per_cluster") == [(c, per_cluster[c])
                                                                             for c in range(len(sizes))]
    assert metrics["cost/proxy_seconds"] == manifest["stages"]["proxy"]["seconds"]
    assert metrics["cost/score_compute_seconds"] == manifest["proxy"]["score_compute_seconds"]
    names = {a.path for a in client.list_artifacts(tracked.info.run_id, "selection")}
    assert {"selection/selected.jsonl", "selection/selection.parquet", "selection/manifest.json",
            "selection/report.html"} <= names
    local = client.download_artifacts(tracked.info.run_id, "selection/selected.jsonl", str(tmp_path))
    assert open(local, "rb").read() == open(run.selected_jsonl(), "rb").read()


def test_a_selection_logged_to_wandb_offline_holds_the_same(tracked_selection, tmp_path, monkeypatch):
    """``log_selection`` (what the selection job calls) into a W&B offline run: each metric on its own axis (W&B's
    step only goes up), the files saved in the run."""
    from s2l_ray import tracking
    from s2l_ray.config import to_dict

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg, manifest, _ = tracked_selection
    run = RunDir(cfg.output)
    with tracking.tracked(TrackingConfig(backend="wandb", uri=str(tmp_path), project="tests"), "selection",
                          to_dict(cfg)) as tracker:
        tracking.log_selection(tracker, run)
    (folder,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    logged = wandb_history(glob.glob(os.path.join(folder, "run-*.wandb"))[0])

    def series(name: str, axis: str) -> list[tuple[int, float]]:
        return [(h[axis], h[name]) for h in logged if name in h]

    assert same_series(series("proxy/train_loss", "proxy/step"), proxy_curve(run))
    assert same_series(series("scoring/rows_per_second", "proxy/step"),
                       [(r["step"], r["rows"] / r["seconds"]) for r in manifest["proxy"]["scored"]])
    sizes = sorted(manifest["clusters"]["cluster_sizes"])
    assert series("clusters/size", "clusters/rank") == list(enumerate(sizes))
    per_cluster = Counter(pq.read_table(run.selection(), columns=["cluster"]).column("cluster").to_pylist())
    assert series("selection/12/selected_per_cluster", "selection/cluster") == [(c, per_cluster[c])
                                                                              for c in range(len(sizes))]
    flat = {k: v for h in logged for k, v in h.items()}
    budget = manifest["selection"]["budgets"]["12"]
    assert {s: flat[f"selection/12/source/{s}"] for s in budget["sources"]} == budget["sources"]
    assert flat["cost/proxy_seconds"] == manifest["stages"]["proxy"]["seconds"]
    saved = os.path.join(folder, "files", "selection")  # copies, not links to files that are gone
    assert not any(os.path.islink(os.path.join(saved, f)) for f in os.listdir(saved))
    assert open(os.path.join(saved, "selected.jsonl"), "rb").read() == open(run.selected_jsonl(), "rb").read()
    assert {"manifest.json", "selection.parquet", "report.html"} <= set(os.listdir(saved))


def test_fine_tuning_is_tracked_by_rank_0_in_wandb_and_evaluation_in_mlflow(ray_local, demo_small, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # reaches the Train worker of rank 0 with the job's config
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = FinetuneConfig(output=str(tmp_path / "target"), corpus=CorpusConfig(path=demo_small["train"]),
                         text=TextConfig(tokenizer=demo_small["tokenizer"], max_length=256), preset="tiny", epochs=1,
                         lr=1e-3, micro_batch_size=4, checkpoint_every=0,
                         tracking=TrackingConfig(backend="wandb", uri=str(tmp_path / "wandb"), project="tests"))
    summary = finetune.run(cfg)
    files = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files  # rank 0 alone, of the 2 workers
    logged = [(h["finetune/step"], h["finetune/loss"]) for h in wandb_history(files[0]) if "finetune/loss" in h]
    assert same_series(logged, [(e["step"], e["loss"]) for e in summary["log"] if "loss" in e])
    (start,) = [r.run for r in wandb_records(files[0]) if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in start.config.update}
    assert start.display_name == "target" and config["lr"] == 1e-3 and config["zero_stage"] == 2

    store = f"file://{tmp_path}/mlruns"
    metrics = evaluate.run(EvaluateConfig(model=cfg.output, output=str(tmp_path / "eval"), max_new_tokens=4, limit=4,
                                          corpus=CorpusConfig(path=demo_small["eval"]),
                                          tracking=TrackingConfig(backend="mlflow", uri=store, project="tests")))
    client, tracked = mlflow_run(store, "tests", "eval")
    assert tracked.data.metrics["eval/accuracy"] == metrics["overall"]["accuracy"]
    assert tracked.data.metrics["eval/loss"] == pytest.approx(metrics["overall"]["loss"])
    for source, rec in metrics["sources"].items():
        assert tracked.data.metrics[f"eval/source/{source}/n"] == rec["n"]
    assert {a.path for a in client.list_artifacts(tracked.info.run_id, "evaluation")} == {
        "evaluation/metrics.json", "evaluation/metrics.md"}


def test_an_unknown_backend_is_refused():
    with pytest.raises(ConfigError, match=r"tracking\.backend must be one of \['none', 'mlflow', 'wandb'\]"):
        check(TrackingConfig(backend="neptune"))
