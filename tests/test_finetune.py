"""Target fine-tuning on CPU with 2 Ray workers and real DeepSpeed (no mocks).

One ZeRO-2 run of packed rows is started as the real job (``jobs/finetune.py``) in a subprocess,
killed with SIGKILL once its first checkpoint is recorded, and rerun to completion; one ZeRO-3 run
of padded rows with the optimizer offloaded to CPU goes uninterrupted in-process (every run with a prompt
template of its own, which evaluating the ZeRO-3 output must use). Both must lower the loss and export a
loadable model, the rerun must start at the recorded checkpoint's step, and since the data order is
deterministic the resumed ZeRO-2 model must equal the uninterrupted ZeRO-3 one. A sweep (two runs in one worker
group) must train its first run exactly as the ZeRO-3 run alone, and is reused run by run.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from s2l_ray import finetune
from s2l_ray.config import ConfigError, CorpusConfig, FinetuneConfig, Placement, TextConfig
from s2l_ray.finetune.record import write_summary
from s2l_ray.layout import RunDir

REPO = Path(__file__).resolve().parents[1]
TRAIN = dict(preset="tiny", epochs=3, lr=1e-3, micro_batch_size=4, checkpoint_every=4, seed=0)  # 24 steps on 60 rows
TEMPLATE = "### Problem\n{prompt}\n### Solution\n"  # every run's own prompt format, not the default


@pytest.fixture(scope="module")
def selection(demo_small, tmp_path_factory):
    """A selection run dir: the small demo's 60 train rows plus one whose prompt leaves no response token."""
    run = tmp_path_factory.mktemp("selection")
    rows = [json.loads(line) for line in open(demo_small["train"])]
    rows.append({"source": "gcd", "prompt": "gcd " * 400, "response": "#### 1", "answer": "1"})
    with open(run / "selected.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"id": f"r{i}", **r}) + "\n")
    (run / "manifest.json").write_text(json.dumps({"selection": {"budgets": {str(len(rows)): {}}}}))
    return str(run)


def _cfg(selection: str, tokenizer: str, output: str, **kw) -> FinetuneConfig:
    return FinetuneConfig(output=output, corpus=CorpusConfig(path=selection),
                          text=TextConfig(tokenizer=tokenizer, max_length=256, template=TEMPLATE), **{**TRAIN, **kw})


@pytest.fixture(scope="module")
def zero3(ray_local, selection, demo_small, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("zero3"))
    return finetune.run(_cfg(selection, demo_small["tokenizer"], out, zero_stage=3, checkpoint_every=0,
                             offload_optimizer=True))


@pytest.fixture(scope="module")
def zero1(ray_local, selection, demo_small, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("zero1"))  # configs/ds_zero1.json, packed rows
    return finetune.run(_cfg(selection, demo_small["tokenizer"], out, zero_stage=1, checkpoint_every=0, packed=True))


def _job(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "finetune.py"), *args], cwd=REPO, env=env,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)


def _tail(log: Path) -> str:
    return "\n".join(log.read_text().splitlines()[-40:])


def recorded(out: str) -> dict | None:
    """The latest checkpoint of a run in progress; None also while Ray Train is writing its record (not atomic)."""
    try:
        return finetune.latest_checkpoint(out)
    except finetune.FinetuneError:
        return None


@pytest.fixture(scope="module")
def resumed(ray_local, selection, demo_small, tmp_path_factory):
    """The ZeRO-2 job (packed rows) killed after its first recorded checkpoint, then rerun: (summary, checkpoint
    step, log)."""
    out = tmp_path_factory.mktemp("zero2")
    log = out.parent / f"{out.name}.log"
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({**TRAIN, "text": {"tokenizer": demo_small["tokenizer"], "max_length": 256,
                                                        "template": TEMPLATE}}))
    args = ["--config", str(config), "--data", selection, "--output", str(out), "--zero-stage", "2",
            "--num-workers", "2", "--set", "packed=true"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = _job(args, log, env)
    try:
        deadline = time.time() + 300
        while recorded(str(out)) is None:
            assert proc.poll() is None, f"the job ended before its first checkpoint:\n{_tail(log)}"
            assert time.time() < deadline, f"no checkpoint within 300s:\n{_tail(log)}"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    checkpoint = finetune.latest_checkpoint(str(out))
    rerun = _job(args, log, env)
    assert rerun.wait(timeout=400) == 0, f"the rerun failed:\n{_tail(log)}"
    return json.loads((out / "finetune.json").read_text()), checkpoint["step"], log.read_text()


def test_an_unreadable_checkpoint_record_is_an_error_not_a_restart(tmp_path):
    assert finetune.latest_checkpoint(str(tmp_path)) is None
    (tmp_path / "train").mkdir()
    assert finetune.latest_checkpoint(str(tmp_path)) is None  # Ray Train made the folder, recorded nothing yet
    record = tmp_path / "train" / "checkpoint_manager_snapshot.json"
    record.write_text('{"checkpoint_results": [')  # cut off
    with pytest.raises(finetune.FinetuneError, match=re.escape(str(record)) + ".*cannot be read"):
        finetune.latest_checkpoint(str(tmp_path))


def test_plan_and_deepspeed_config():
    cfg = FinetuneConfig(workers=Placement(count=2), micro_batch_size=4, grad_accum=2, epochs=3, grad_clip=0.5)
    plan = finetune.make_plan(61, cfg)
    assert (plan.rows_per_worker, plan.micro_batches_per_epoch, plan.steps_per_epoch) == (30, 8, 4)
    assert (plan.total_steps, plan.warmup_steps) == (12, 0)
    with pytest.raises(finetune.FinetuneError, match="no optimizer step"):
        finetune.make_plan(7, cfg)
    ds = finetune.deepspeed_config(replace(cfg, zero_stage=3, offload_optimizer=True), use_gpu=False)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert finetune.deepspeed_config(cfg, use_gpu=True)["bf16"]["enabled"] is True


def test_deepspeed_config_errors(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 2"):
        finetune.deepspeed_config(FinetuneConfig(deepspeed_config=str(bad)), use_gpu=False)
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="remove 'optimizer'"):
        finetune.deepspeed_config(FinetuneConfig(deepspeed_config=str(bad)), use_gpu=False)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size"):
        finetune.deepspeed_config(FinetuneConfig(deepspeed_config=str(bad)), use_gpu=False)


def test_resolve_data_follows_the_manifest(tmp_path, selection, demo_small):
    assert finetune.resolve_data(FinetuneConfig(corpus=CorpusConfig(path=selection))).endswith("/selected.jsonl")
    several = tmp_path / "several"
    several.mkdir()
    for name in ("selected-10.jsonl", "selected-20.jsonl", "selected.jsonl"):  # the last: an earlier run's, stale
        (several / name).write_text("{}\n")
    (several / "manifest.json").write_text(json.dumps({"selection": {"budgets": {"10": {}, "20": {}}}}))
    with pytest.raises(finetune.FinetuneError, match="budgets 10, 20; choose one with --budget"):
        finetune.resolve_data(FinetuneConfig(corpus=CorpusConfig(path=str(several))))
    picked = finetune.resolve_data(FinetuneConfig(corpus=CorpusConfig(path=str(several)), budget=20))
    assert picked.endswith("selected-20.jsonl")
    with pytest.raises(finetune.FinetuneError, match="no selection of budget 30"):
        finetune.resolve_data(FinetuneConfig(corpus=CorpusConfig(path=str(several)), budget=30))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "manifest.json").write_text("{}")
    (unfinished / "selected.jsonl").write_text("{}\n")
    with pytest.raises(finetune.FinetuneError, match="has not finished"):
        finetune.resolve_data(FinetuneConfig(corpus=CorpusConfig(path=str(unfinished))))
    with pytest.raises(finetune.FinetuneError, match="not found"):
        finetune.resolve_data(FinetuneConfig(corpus=CorpusConfig(path=str(tmp_path / "missing"))))


def test_no_model_on_a_users_run_is_refused_with_advice(selection):
    with pytest.raises(finetune.FinetuneError, match="selected from your own corpus: pass --model"):
        finetune.resolve_model(FinetuneConfig(corpus=CorpusConfig(path=selection)))


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(resumed):
    summary, step, log = resumed
    assert summary["status"] == "done" and summary["rows"] == 60
    assert f"ZeRO-2, 2 workers, packed rows; resuming from step {step}" in log  # the rerun's plan line
    assert summary["data_stats"]["dropped"]["no_response_tokens"] == 1
    total = summary["plan"]["total_steps"]
    assert 0 < step < total, "the job was not killed mid-training"
    assert summary["resumed_from_step"] == step
    assert summary["attempts"] == [0, step]
    assert [e["step"] for e in summary["log"] if "loss" in e] == list(range(1, total + 1))  # no step trained twice


@pytest.mark.slow
@pytest.mark.parametrize("run", ["resumed", "zero3"])
def test_training_lowers_loss_and_exports_a_loadable_model(run, request, demo_small):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from s2l_ray.corpus import normalise
    from s2l_ray.models import build_model, load_tokenizer
    from s2l_ray.scoring import reference_losses

    summary = request.getfixturevalue(run)
    summary = summary[0] if run == "resumed" else summary
    losses = [e["loss"] for e in summary["log"] if "loss" in e]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    model = AutoModelForCausalLM.from_pretrained(summary["model"])
    tok = AutoTokenizer.from_pretrained(summary["model"])
    rows = [normalise(json.loads(line), CorpusConfig()) for line in open(demo_small["train"])][:16]
    fresh = build_model("tiny", load_tokenizer(demo_small["tokenizer"]), seed=0, max_length=256).eval()
    text = TextConfig(max_length=256, template=TEMPLATE)
    assert reference_losses(model.eval(), tok, rows, text).mean() < reference_losses(fresh, tok, rows, text).mean() - 0.3
    ids = tok(TEMPLATE.format(prompt="Find the GCD of 12 and 18."), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["resumed", "zero1"])
def test_resumed_zero2_and_zero1_equal_uninterrupted_zero3(run, request, zero3):
    """Both train packed rows (no padding), ZeRO-3 padded ones: the same weights and per-step losses, also after the
    ZeRO-2 run was killed and resumed."""
    from safetensors.torch import load_file

    other = request.getfixturevalue(run)
    other = other[0] if run == "resumed" else other
    a = load_file(str(Path(other["model"]) / "model.safetensors"))
    b = load_file(str(Path(zero3["model"]) / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # resumed at the exact position of its data
    la, lb = ([e["loss"] for e in r["log"] if "loss" in e] for r in (other, zero3))
    assert len(la) == len(lb) and max(abs(x - y) for x, y in zip(la, lb)) < 1e-5


@pytest.mark.slow
def test_rerun_of_a_finished_run_is_reused_and_another_config_refused(zero3, selection, demo_small):
    cfg = _cfg(selection, demo_small["tokenizer"], str(Path(zero3["model"]).parent), zero_stage=3, checkpoint_every=0,
               offload_optimizer=True)
    assert finetune.run(cfg) == zero3
    with pytest.raises(finetune.FinetuneError, match="another config"):
        finetune.run(replace(cfg, lr=5e-4))


@pytest.fixture(scope="module")
def sweep(ray_local, selection, demo_small, tmp_path_factory):
    """The ZeRO-3 run's config (seed 0) and seed 1 with length grouping, fine-tuned in one sweep: (configs, records)."""
    root = tmp_path_factory.mktemp("sweep")
    cfgs = [_cfg(selection, demo_small["tokenizer"], str(root / f"seed{s}"), zero_stage=3, checkpoint_every=0,
                 offload_optimizer=True, seed=s, length_window=w) for s, w in ((0, 1), (1, 4))]
    return cfgs, finetune.run_many(cfgs, sweep_dir=str(root / "sweep"))


@pytest.mark.slow
def test_a_sweep_trains_each_run_as_it_would_alone(sweep, zero3):
    from safetensors.torch import load_file

    _, (a, b) = sweep
    assert a["status"] == b["status"] == "done" and a["sweep_runs"] == b["sweep_runs"] == 2
    for r in (a, b):
        assert [e["step"] for e in r["log"] if "loss" in e] == list(range(1, r["plan"]["total_steps"] + 1))
    alone = load_file(str(Path(zero3["model"]) / "model.safetensors"))
    swept = load_file(str(Path(a["model"]) / "model.safetensors"))
    assert max((alone[k] - swept[k]).abs().max().item() for k in alone) < 1e-4
    la, lz, lb = ([e["loss"] for e in r["log"] if "loss" in e] for r in (a, zero3, b))
    assert max(abs(x - y) for x, y in zip(la, lz)) < 1e-3
    assert max(abs(x - y) for x, y in zip(la, lb)) > 1e-2  # seed 1 is another run, not a copy
    assert sum(lb[-4:]) / 4 < sum(lb[:4]) / 4 - 0.3  # grouped by length: every planned step ran, the loss fell


@pytest.mark.slow
def test_a_sweep_is_reused_run_by_run(sweep):
    cfgs, records = sweep
    sweep_dir = str(Path(cfgs[0].output).parent / "sweep")
    assert finetune.run_many(cfgs, sweep_dir=sweep_dir) == records  # all done: nothing starts
    # The sweep wrote seed 1's model, but its record was left unfinished (the driver stopped after the fit):
    # the model is taken as it is, not trained again.
    out = Path(cfgs[1].output)
    state = (out / finetune.STATE_FILE).read_text()
    write_summary(RunDir(str(out)), {**records[1], "status": "running"})
    again = finetune.run_many(cfgs, sweep_dir=sweep_dir)
    assert (out / finetune.STATE_FILE).read_text() == state
    assert again[1]["status"] == "done" and again[1]["log"] == records[1]["log"]
    with pytest.raises(ConfigError, match="share workers"):
        finetune.run_many([replace(c, output=f"{c.output}-new", workers=Placement(count=n)) for c, n in zip(cfgs, (1, 2))],
                          sweep_dir=sweep_dir)


@pytest.mark.slow
def test_evaluation_prompts_a_fine_tuned_model_as_it_was_trained(ray_local, zero3, demo_small, tmp_path):
    """A model fine-tuned with its own template is evaluated through that template (recorded in finetune.json):
    each row's evaluation loss is the model's loss on the row rendered that way; an explicit template wins."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from s2l_ray import evaluate
    from s2l_ray.config import EvaluateConfig
    from s2l_ray.corpus import normalise
    from s2l_ray.scoring import reference_losses

    model = AutoModelForCausalLM.from_pretrained(zero3["model"]).eval()
    tok = AutoTokenizer.from_pretrained(zero3["model"])
    rows = [normalise(json.loads(line), CorpusConfig()) for line in open(demo_small["eval"])][:4]
    ecfg = EvaluateConfig(model=str(Path(zero3["model"]).parent), output=str(tmp_path / "eval"), max_new_tokens=4,
                          limit=4, corpus=CorpusConfig(path=demo_small["eval"]), text=TextConfig(max_length=256))
    for text, out in ((TextConfig(template=TEMPLATE, max_length=256), "eval"),
                      (TextConfig(template="Q: {prompt}\nA: ", max_length=256), "explicit")):
        evaluate.run(replace(ecfg, output=str(tmp_path / out),
                             text=ecfg.text if out == "eval" else text))
        preds = [json.loads(line) for line in open(tmp_path / out / "predictions.jsonl")]
        ref = reference_losses(model, tok, rows, text)
        assert all(math.isclose(p["loss"], r, rel_tol=1e-4) for p, r in zip(preds, ref)), (out, preds, ref)
