"""The proxy stage end to end on a real local Ray: 2 Train workers, trajectories streamed to Parquet.

The corpus is the small demo (3 sources, written source by source) stored in 8 parts of 8 rows.
"""
import json
import os
import re
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import small_selection
from s2l_ray import pipeline
from s2l_ray.cli import user_error
from s2l_ray.selection.stage import SELECTION_FILES
from s2l_ray.config import load_config
from s2l_ray.layout import TRAJECTORY_SCHEMA, LayoutError, RunDir
from s2l_ray.models import load_model, load_tokenizer
from s2l_ray.proxy import ProxyError, ScoringFailed, make_plan
from s2l_ray.scoring import reference_losses

T = 3  # small_selection's points


def config(demo_small, out, **extra):
    return load_config(None, small_selection(demo_small, out, **extra))


def run_stages(cfg):
    run = RunDir(cfg.output)
    cfg, inputs = pipeline.prepare_inputs(cfg, run)
    corpus = pipeline.run_corpus(run, cfg)
    return run, corpus, pipeline.run_proxy(run, cfg, inputs, corpus)


@pytest.fixture(scope="module")
def proxy_run(ray_local, demo_small, tmp_path_factory):
    cfg = config(demo_small, tmp_path_factory.mktemp("proxy") / "run")
    return (cfg, *run_stages(cfg))


def read_points(run):
    done = run.done_points()
    return {t: pq.read_table(rec["files"], partitioning=None) for t, rec in sorted(done.items())}


def test_trajectories_are_complete_and_unique(proxy_run, demo_small):
    cfg, run, corpus, stats = proxy_run
    n = corpus["rows"]
    assert len(corpus["files"]) >= 6
    corpus_ids = pq.read_table(run.corpus_files(), columns=["idx", "id"]).to_pydict()
    points = read_points(run)
    assert sorted(points) == list(range(T))
    plan = make_plan(n, cfg.proxy)
    rows = []
    for t, table in points.items():
        assert table.schema == TRAJECTORY_SCHEMA
        assert table.num_rows == n
        assert set(table.column("checkpoint").to_pylist()) == {t}
        assert set(table.column("step").to_pylist()) == {plan.point_steps[t]}
        assert sorted(zip(table.column("idx").to_pylist(), table.column("id").to_pylist())) == \
            sorted(zip(corpus_ids["idx"], corpus_ids["id"]))
        rows += list(zip(table.column("id").to_pylist(), table.column("checkpoint").to_pylist()))
        assert np.isfinite(table.column("loss").to_numpy()).all()
    assert len(rows) == n * T == len(set(rows))
    assert stats["trained"] and list(stats["plan"]["point_steps"]) == list(plan.point_steps)
    # training moves the loss: the trajectory is not flat
    means = [points[t].column("loss").to_numpy().mean() for t in range(T)]
    assert means[-1] < means[0]


def test_pipeline_loss_equals_checkpoint_loss_alone(proxy_run, demo_small):
    cfg, run, corpus, _ = proxy_run
    tok = load_tokenizer(demo_small["tokenizer"])
    rows = pq.read_table(run.corpus_files(), columns=["id", "prompt", "response", "messages"]).to_pylist()
    for t in (0, T - 1):
        model = load_model(os.path.join(run.proxy_checkpoints()[t]["path"], "model")).eval()
        table = read_points(run)[t].to_pydict()
        got = dict(zip(table["id"], table["loss"]))
        ref = reference_losses(model, tok, rows, cfg.text)
        np.testing.assert_allclose([got[r["id"]] for r in rows], ref, rtol=0, atol=1e-5)


def test_rerun_recomputes_nothing(proxy_run):
    cfg, run, _, _ = proxy_run
    before = {t: [os.path.getmtime(f) for f in rec["files"]] for t, rec in run.done_points().items()}
    _, _, stats = run_stages(cfg)
    assert not stats["trained"] and stats["reused_points"] == list(range(T)) and "scored" not in stats
    assert {t: [os.path.getmtime(f) for f in rec["files"]] for t, rec in run.done_points().items()} == before


def test_unscored_checkpoint_is_scored_without_retraining(proxy_run):
    cfg, run, _, _ = proxy_run
    done_file = run.trajectories_done
    raw = json.load(open(done_file))
    old = raw["points"].pop(str(T - 1))
    json.dump(raw, open(done_file, "w"))
    _, _, stats = run_stages(cfg)
    assert not stats["trained"] and [s["t"] for s in stats["scored"]] == [T - 1]
    new = run.done_points()[T - 1]
    assert new["rows"] == old["rows"] and new["step"] == old["step"]
    assert len(new["files"]) >= 1 and all(os.path.exists(f) for f in new["files"])


def test_other_proxy_seed_refuses_stale_trajectories(proxy_run, demo_small):
    cfg, run, _, _ = proxy_run
    with pytest.raises(LayoutError, match=r"another proxy config \(proxy.seed included\)"):
        run_stages(config(demo_small, cfg.output, **{"proxy.seed": cfg.proxy.seed + 1}))


def test_another_selection_seed_reuses_the_trajectories_and_draws_another_subset(proxy_run):
    cfg, run, _, _ = proxy_run
    before = {t: [(f, os.path.getmtime(f)) for f in rec["files"]] for t, rec in run.done_points().items()}
    picked = []
    for seed in (0, 7):
        pipeline.select(load_config(None, {**vars_of(cfg), "seed": seed, "select.budgets": "0.25", "cluster.k": 3}))
        picked.append(pq.read_table(run.selection()).column("id").to_pylist())
    assert {t: [(f, os.path.getmtime(f)) for f in rec["files"]] for t, rec in run.done_points().items()} == before
    assert picked[0] != picked[1] and len(picked[0]) == len(picked[1])


def test_a_selection_removes_the_files_of_budgets_it_does_not_rewrite(proxy_run):
    cfg, run, _, _ = proxy_run
    pipeline.select(load_config(None, {**vars_of(cfg), "select.budgets": "10,20", "cluster.k": 3}))
    assert os.path.exists(run.selected_jsonl(10)) and not os.path.exists(run.selected_jsonl())
    pipeline.select(load_config(None, {**vars_of(cfg), "select.budgets": "15", "cluster.k": 3}))
    left = sorted(f for f in os.listdir(run.root) if re.fullmatch(SELECTION_FILES, f))
    assert left == ["axolotl.yaml", "dataset_info.json", "selected.jsonl", "selected.original.jsonl",
                    "selected.trl.parquet", "selection.parquet"]  # no file of budgets 10 and 20 in any form


def test_another_method_or_budget_rescores_nothing(proxy_run):
    cfg, run, corpus, _ = proxy_run
    before = {t: [os.path.getmtime(f) for f in rec["files"]] for t, rec in run.done_points().items()}
    made = {k: run.read_manifest()[k] for k in ("proxy", "stages")}
    for method, budget in (("s2l", "0.25"), ("learnability", "0.25"), ("random", "0.5")):
        manifest = pipeline.select(load_config(None, {**vars_of(cfg), "select.method": method,
                                                      "select.budgets": budget, "cluster.k": 3}))
        assert manifest["proxy"] == made["proxy"]  # the record of how the trajectories were made stays
        assert manifest["stages"]["proxy"] == made["stages"]["proxy"]
        sel = pq.read_table(run.selection())
        assert set(sel.column("method").to_pylist()) == {method}
        assert sel.num_rows == round(float(budget) * corpus["rows"])
    assert {t: [os.path.getmtime(f) for f in rec["files"]] for t, rec in run.done_points().items()} == before


def test_training_order_mixes_sources_and_changes_every_epoch(proxy_run):
    """The order the proxy's workers read (batches.epoch_positions) on this corpus stored sorted by source."""
    from s2l_ray.batches import epoch_positions

    cfg, run, corpus, _ = proxy_run
    source = np.array(pq.read_table(run.corpus_files(), columns=["source"]).column("source").to_pylist())
    n, world = len(source), cfg.proxy.workers.count
    assert list(source) == sorted(source, key=list(dict.fromkeys(source)).index)  # stored source by source
    share = {s: float(np.mean(source == s)) for s in set(source)}
    epochs = [np.concatenate([epoch_positions(n, cfg.proxy.seed, e, r, world) for r in range(world)])
              for e in range(3)]
    for order in epochs:
        assert len(set(order.tolist())) == len(order) == n // world * world
        for tenth in np.array_split(order, 10):  # 6 rows each: every source within 0.5 of its share (1/3)
            for s, p in share.items():
                assert abs(np.mean(source[tenth] == s) - p) <= 0.5
        halves = np.array_split(order, 2)
        for s, p in share.items():
            assert all(abs(np.mean(source[h] == s) - p) < 0.2 for h in halves)
    assert all(np.mean(epochs[0] != epochs[e]) > 0.8 for e in (1, 2))  # positions differ between epochs


def test_same_seed_same_trajectories_and_selection(proxy_run, tracked_selection):
    """A second, independent proxy run with the same seeds and inputs (8 corpus parts, 2 workers; the session's
    tracked selection): byte-identical trajectory files, identical selection."""
    cfg, run, _, _ = proxy_run
    other_cfg, again, _ = tracked_selection
    first = pipeline.select(load_config(None, {**vars_of(cfg), "cluster.k": other_cfg.cluster.k,
                                               "select.budgets": other_cfg.select.budgets}))
    assert again["proxy"]["trained"] and again["corpus"]["fingerprint"] == first["corpus"]["fingerprint"]
    other = RunDir(other_cfg.output)
    for t in range(T):
        a, b = run.done_points()[t]["files"], other.done_points()[t]["files"]
        assert len(a) == len(b) >= 6
        assert [open(f, "rb").read() for f in a] == [open(f, "rb").read() for f in b]
    ids = [pq.read_table(r.selection()).column("id") for r in (run, other)]
    assert ids[0].equals(ids[1])
    assert open(run.selected_jsonl(), "rb").read() == open(other.selected_jsonl(), "rb").read()


def vars_of(cfg) -> dict:
    return {"output": cfg.output, "corpus.path": cfg.corpus.path, "text.tokenizer": cfg.text.tokenizer,
            "proxy.epochs": cfg.proxy.epochs, "proxy.batch_size": cfg.proxy.batch_size,
            "proxy.num_points": cfg.proxy.num_points, "proxy.workers.count": cfg.proxy.workers.count,
            "proxy.workers.cpus": cfg.proxy.workers.cpus, "proxy.lr": cfg.proxy.lr,
            "corpus.part_rows": cfg.corpus.part_rows}


def test_plan_spreads_points_evenly():
    from s2l_ray.config import Placement, ProxyConfig

    plan = make_plan(100, ProxyConfig(workers=Placement(count=2), batch_size=8, epochs=3, num_points=4))
    assert (plan.rows_per_worker, plan.steps_per_epoch, plan.total_steps) == (50, 7, 21)
    assert plan.point_steps == (5, 10, 16, 21)
    with pytest.raises(ProxyError, match="num_points"):
        make_plan(10, ProxyConfig(workers=Placement(count=2), batch_size=8, epochs=1, num_points=4))


def mtimes(run: RunDir) -> dict:
    return {t: [(f, os.path.getmtime(f)) for f in rec["files"]] for t, rec in run.done_points().items()}


def test_target_examples_are_scored_at_every_point_with_the_exact_loss(proxy_run, demo_small, tmp_path):
    """--target after the proxy has run: the target rows are scored from the saved checkpoints (nothing is
    trained, no corpus file rewritten), each with its loss under that checkpoint alone; s2l-target selects."""
    cfg, run, _, _ = proxy_run
    corpus_before, checkpoints = mtimes(run), run.proxy_checkpoints()
    made = run.read_manifest()["proxy"]
    manifest = pipeline.select(load_config(None, {**vars_of(cfg), "select.target": demo_small["target"],
                                                  "select.method": "s2l-target", "select.budgets": "0.25",
                                                  "cluster.k": 3}))
    assert mtimes(run) == corpus_before and run.proxy_checkpoints() == checkpoints and manifest["proxy"] == made
    target = run.target
    rows = pq.read_table(target.corpus_files(), columns=["id", "prompt", "response", "messages"]).to_pylist()
    assert len(rows) == 50 == manifest["selection"]["target_rows"] and sorted(target.done_points()) == list(range(T))
    tok = load_tokenizer(demo_small["tokenizer"])
    for t in (0, T - 1):
        model = load_model(os.path.join(checkpoints[t]["path"], "model")).eval()
        table = pq.read_table(target.done_points()[t]["files"], partitioning=None).to_pydict()
        got = dict(zip(table["id"], table["loss"]))
        np.testing.assert_allclose([got[r["id"]] for r in rows], reference_losses(model, tok, rows, cfg.text),
                                   rtol=0, atol=1e-5)
    assert manifest["selection"]["budgets"]["15"]["selected"] == 15


def test_embedding_target_embeds_every_row_as_the_final_checkpoint_alone_would(proxy_run, demo_small):
    """The extra pass: each stored embedding is the mean of the final checkpoint's last hidden states over the
    row's own tokens, computed for that row alone; the ranking is by cosine to the nearest target example."""
    import torch

    from s2l_ray.embeddings import read, scores

    cfg, run, _, _ = proxy_run
    manifest = pipeline.select(load_config(None, {**vars_of(cfg), "select.target": demo_small["target"],
                                                  "select.method": "embedding-target", "select.budgets": "10"}))
    model = load_model(os.path.join(run.proxy_checkpoints()[T - 1]["path"], "model")).eval()
    stored = pq.read_table(run.corpus_files(), columns=["id", "input_ids"]).to_pylist()
    got = read(run)
    with torch.no_grad():
        alone = np.stack([model.base_model(input_ids=torch.tensor([r["input_ids"]])).last_hidden_state[0].mean(0)
                          .numpy() for r in stored])
    np.testing.assert_allclose(got, alone, rtol=0, atol=1e-5)
    similarity = scores(got, read(run.target), "nearest")
    picked = pq.read_table(run.selection()).column("id").to_pylist()
    assert sorted(picked) == sorted(stored[i]["id"] for i in np.argsort(-similarity, kind="stable")[:10])
    assert manifest["stages"]["embeddings"]["rows"] == len(stored)


def test_another_target_set_rescores_only_the_target_rows(proxy_run, demo_small, tmp_path):
    cfg, run, _, _ = proxy_run
    other = tmp_path / "gcd.jsonl"  # another task: the demo's held-out gcd problems as the target
    other.write_text("".join(line for line in open(demo_small["eval"]) if '"source": "gcd"' in line))
    base = {**vars_of(cfg), "select.method": "s2l-target", "select.budgets": "0.25", "cluster.k": 3}
    pipeline.select(load_config(None, {**base, "select.target": demo_small["target"]}))
    corpus_before, target_before = mtimes(run), mtimes(run.target)
    record = run.read_manifest()["proxy"]
    manifest = pipeline.select(load_config(None, {**base, "select.target": str(other)}))
    assert mtimes(run) == corpus_before  # no corpus trajectory file rewritten
    assert manifest["proxy"] == record  # the record of how the trajectories were made stays
    after = mtimes(run.target)
    assert sorted(after) == list(range(T)) and all(after[t] != target_before[t] for t in range(T))
    assert run.target.read_manifest()["corpus"]["sources"] == {"gcd": 5}
    picked = manifest["selection"]["budgets"]["15"]["sources"]
    assert picked["gcd"] > 15 / 3  # the gcd target pulls the budget to its clusters


def test_a_scoring_failure_ends_the_run_with_the_scorers_error(ray_local, demo_small, tmp_path):
    """Point 0's files cannot be written (a file stands where its folder goes): the run stops with one error of
    the project's naming the point and the cause, not Ray Train's wrapping of it."""
    cfg = config(demo_small, tmp_path / "run")
    blocked = tmp_path / "run" / "trajectories" / "checkpoint=0"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder")
    with pytest.raises(ScoringFailed, match=r"trajectory point 0: \w+Error") as err:
        run_stages(cfg)
    assert user_error(err.value) is err.value
    assert 0 not in RunDir(cfg.output).done_points()


def test_workers_share_a_gpu_only_when_ray_would_pack_two_on_one(ray_local, demo_small, tmp_path):
    """Above half a GPU each, Ray gives every worker a GPU of its own (0.75 leaves room for a scoring actor); at a
    half or less, two NCCL ranks could land on one GPU, which NCCL refuses."""
    from s2l_ray.proxy import ProxyError

    pipeline.check_gpus(config(demo_small, tmp_path / "a", **{"proxy.use_gpu": "true", "proxy.workers.gpus": 0.75}))
    with pytest.raises(ProxyError, match=r"proxy\.workers\.gpus=0\.5 with 2 workers can put two training ranks"):
        pipeline.check_gpus(config(demo_small, tmp_path / "b", **{"proxy.use_gpu": "true", "proxy.workers.gpus": 0.5}))


def test_after_a_failed_point_the_next_checkpoint_is_recorded_and_refused(proxy_run, tmp_path):
    """The coordinator's side of stopping: once a point has failed, the checkpoint submitted next is recorded (a
    rerun resumes from it) and refused, which ends the training run."""
    import shutil

    import ray
    from ray.train import Checkpoint

    from s2l_ray.config import ScoringConfig
    from s2l_ray.proxy import ScoringCoordinator

    run = RunDir(str(tmp_path / "run"))  # the stored corpus of a finished run, without its trajectories
    shutil.copytree(proxy_run[1].uri, run.uri, ignore=shutil.ignore_patterns("trajectories"))
    coordinator = ScoringCoordinator.remote([run.uri], [0, 1], ScoringConfig(), False, "fp32")
    coordinator.score.remote(0, 4, Checkpoint(str(tmp_path / "no-such-checkpoint")))
    deadline = time.time() + 120
    while not ray.get(coordinator.failed.remote()):
        assert time.time() < deadline, "point 0 neither scored nor failed within 120 s"
        time.sleep(0.1)
    with pytest.raises(ray.exceptions.RayTaskError, match=r"ScoringFailed.*trajectory point 0"):
        ray.get(coordinator.submit.remote(1, 8, Checkpoint(str(tmp_path / "ckpt1")), 0, [1.0], [2.0]))
    assert run.proxy_checkpoints()[1]["step"] == 8
    scored, errors = ray.get(coordinator.finish.remote())
    assert scored == [] and len(errors) == 1 and errors[0].startswith("trajectory point 0: ")
    ray.kill(coordinator)


def test_a_rerun_with_another_piece_size_reuses_the_stored_corpus(proxy_run):
    """``corpus.piece_mb`` only splits the reading (the stored rows are the same: tests/test_corpus.py), so it is
    not part of the corpus's identity; ``part_rows``, the unit of scoring, is."""
    from dataclasses import replace

    cfg, run, corpus, _ = proxy_run
    cfg, _ = pipeline.prepare_inputs(cfg, run)
    before = {f: os.path.getmtime(f) for f in run.corpus_files()}
    other = replace(cfg, corpus=replace(cfg.corpus, piece_mb=cfg.corpus.piece_mb / 1000))
    assert pipeline.run_corpus(run, other)["fingerprint"] == corpus["fingerprint"]
    assert {f: os.path.getmtime(f) for f in run.corpus_files()} == before
    with pytest.raises(LayoutError, match="holds trajectories of another corpus"):
        pipeline.run_corpus(run, replace(cfg, corpus=replace(cfg.corpus, part_rows=cfg.corpus.part_rows * 2)))


def test_precision_auto_is_bf16_only_on_gpus_that_do_it_natively():
    from s2l_ray.models import native_bf16, resolve_bf16

    assert native_bf16({"GPU": 8, "accelerator_type:A100": 1}) and native_bf16({"GPU": 1, "accelerator_type:L4": 1})
    assert not native_bf16({"GPU": 4, "accelerator_type:T4": 1})  # GCP's N1 nodes: T4 and V100
    assert not native_bf16({"GPU": 8, "accelerator_type:A100": 1, "accelerator_type:V100": 1})
    assert native_bf16({"CPU": 0})  # no GPU node yet (an autoscaling cluster): taken to
    assert not resolve_bf16("auto", use_gpu=False) and resolve_bf16("bf16", use_gpu=False)


def test_trajectories_made_in_another_precision_are_refused_not_mixed(proxy_run, demo_small):
    """A run whose points were made in bf16 (on GPUs) is rerun where ``auto`` resolves to fp32 (here, on CPU): it
    is refused, naming the setting that goes on with it; the resolved precision is what every run records."""
    cfg, run, _, _ = proxy_run
    assert run.read_manifest()["stages"]["proxy"]["precision"] == "fp32"
    record = run.read_manifest()["stages"]["proxy"]
    run.update_manifest(stages={"proxy": {**record, "precision": "bf16"}})  # as a GPU run would have recorded
    try:
        with pytest.raises(LayoutError, match=r"made in bf16, and proxy.precision=auto resolves to fp32 here; set "
                                              r"proxy.precision=bf16"):
            run_stages(cfg)
    finally:
        run.update_manifest(stages={"proxy": record})
