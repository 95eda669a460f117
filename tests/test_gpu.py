"""The GPU suite: what only a CUDA machine can check, skipped cleanly without one.

Run on a GPU machine with ``bash .ci/gpu`` (this file, then the scoring benchmark at the Pythia-70M shape). Covers a
bf16 proxy run (training and trajectory points), GPU scoring against fp32 CPU scoring, cuML's k-means against
faiss on the same data, a 2-rank NCCL proxy (with two GPUs), and DeepSpeed bf16 ZeRO-2 and ZeRO-3 steps.
Tolerances are stated where they are used.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

BF16_RTOL = 0.03  # a bf16 loss against fp32: bf16 keeps 8 bits of mantissa, and the losses are means of ~50 tokens
FP32_ATOL = 1e-4  # fp32 on GPU against fp32 on CPU: summation order only (TF32 is off for matmuls by default)
INERTIA_MARGIN = 0.02  # cuML's k-means inertia within 2% of faiss's on the same sample, seeds and iterations


def _proxy_config(demo_small, out, **extra):
    from s2l_ray.config import load_config

    return load_config(None, {"output": str(out), "corpus.path": demo_small["train"],
                              "text.tokenizer": demo_small["tokenizer"], "proxy.epochs": 1, "proxy.batch_size": 8,
                              "proxy.num_points": 3, "proxy.workers.count": 1, "proxy.use_gpu": "true",
                              "proxy.precision": "bf16", "proxy.workers.gpus": 0.5, "scoring.actors.gpus": 0.25,
                              "corpus.part_rows": 16, **extra})


def _run_proxy(cfg):
    from s2l_ray import pipeline
    from s2l_ray.layout import RunDir

    run = RunDir(cfg.output)
    cfg, inputs = pipeline.prepare_inputs(cfg, run)
    corpus = pipeline.run_corpus(run, cfg)
    pipeline.run_proxy(run, cfg, inputs, corpus)
    return run, corpus


def _trajectories(run) -> np.ndarray:
    done = run.done_points()
    tables = [pq.read_table(rec["files"], partitioning=None).sort_by("idx") for _, rec in sorted(done.items())]
    return np.stack([t.column("loss").to_numpy() for t in tables], axis=1)


def test_a_bf16_proxy_trains_and_scores_every_point(ray_local, demo_small, tmp_path):
    run, corpus = _run_proxy(_proxy_config(demo_small, tmp_path / "run"))
    x = _trajectories(run)
    assert x.shape == (corpus["rows"], 3) and np.isfinite(x).all()
    assert run.read_manifest()["stages"]["proxy"]["precision"] == "bf16"
    assert x[:, -1].mean() < x[:, 0].mean(), "training lowers the mean loss"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_two_rank_nccl_proxy_scores_every_row_once(ray_local, demo_small, tmp_path):
    run, corpus = _run_proxy(_proxy_config(demo_small, tmp_path / "run", **{
        "proxy.workers.count": 2, "proxy.workers.gpus": 1, "scoring.actors.gpus": 0}))
    assert _trajectories(run).shape == (corpus["rows"], 3)


def test_gpu_scoring_agrees_with_fp32_cpu_scoring(demo_small):
    from transformers import AutoModelForCausalLM

    from s2l_ray.config import TextConfig
    from s2l_ray.models import load_tokenizer, preset_config
    from s2l_ray.scoring import score_rows
    from s2l_ray.text import encode

    tok = load_tokenizer(demo_small["tokenizer"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("tiny", tok)).eval()
    rows = [json.loads(line) for line in open(demo_small["train"])]
    text = TextConfig()
    enc = encode(tok, [r["prompt"] for r in rows], [r["response"] for r in rows], [None] * len(rows),
                 template=text.template, chat=None, max_length=text.max_length)
    args = (enc["input_ids"], enc["spans"], tok.pad_token_id, 4096)
    with torch.no_grad():
        cpu = score_rows(model, *args, torch.device("cpu"))["loss"]
        gpu = model.to("cuda")
        fp32 = score_rows(gpu, *args, torch.device("cuda"))["loss"]
        bf16 = score_rows(gpu, *args, torch.device("cuda"), autocast_dtype=torch.bfloat16)["loss"]
    np.testing.assert_allclose(fp32, cpu, rtol=0, atol=FP32_ATOL)
    np.testing.assert_allclose(bf16, cpu, rtol=BF16_RTOL, atol=0)


def test_cuml_kmeans_agrees_with_faiss():
    from s2l_ray import clustering as cl

    if not cl.cuml_usable():
        pytest.skip("cuML is not installed")
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (20, 12))
    x = (centres[rng.integers(0, 20, 20_000)] + rng.normal(0, 1, (20_000, 12))).astype(np.float32)

    def inertia(c: np.ndarray) -> float:
        return float(((x - c[cl.assign(x, c, backend="faiss")[0]]) ** 2).sum())

    faiss_c = cl.fit(x, 20, seed=0, backend="faiss")
    cuml_c = cl.fit(x, 20, seed=0, backend="cuml")
    assert inertia(cuml_c) <= (1 + INERTIA_MARGIN) * inertia(faiss_c)
    labels, dist = cl.assign(x, cuml_c, backend="cuml")
    ref_labels, ref_dist = cl.assign(x, cuml_c, backend="faiss")
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-3)
    assert (labels == ref_labels).mean() > 0.999  # ties between equidistant centroids may break either way


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_bf16_fine_tuning_lowers_the_loss(ray_local, demo_small, tmp_path, stage):
    from s2l_ray import finetune
    from s2l_ray.config import CorpusConfig, FinetuneConfig, Placement, TextConfig

    sel = tmp_path / "selection"
    sel.mkdir()
    with open(sel / "selected.jsonl", "w") as f:
        for i, line in enumerate(open(demo_small["train"])):
            f.write(json.dumps({"id": f"r{i}", **json.loads(line)}) + "\n")
    (sel / "manifest.json").write_text(json.dumps({"selection": {"budgets": {"60": {}}}}))
    gpus = min(torch.cuda.device_count(), 2)
    summary = finetune.run(FinetuneConfig(
        output=str(tmp_path / "out"), corpus=CorpusConfig(path=str(sel)),
        text=TextConfig(tokenizer=demo_small["tokenizer"], max_length=256), preset="tiny", epochs=3, lr=1e-3,
        micro_batch_size=4, checkpoint_every=0, seed=0, zero_stage=stage, workers=Placement(count=gpus), use_gpu="true",
        precision="bf16"))
    losses = [e["loss"] for e in summary["log"] if "loss" in e]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
