"""The users' world: the real pretrained SmolLM2-135M-Instruct (and its 2-layer cut as the proxy, from a Hub cache),
chat data in messages and ShareGPT form, GSM8K's own evaluation schema; real Ray, real DeepSpeed on CPU."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from s2l_ray import evaluate, finetune, pipeline
from s2l_ray.config import CorpusConfig, EvaluateConfig, FinetuneConfig, Placement, TextConfig, load_config
from s2l_ray.layout import RunDir
from s2l_ray.models import load_model, load_tokenizer
from s2l_ray.scoring import reference_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chat_run(hub_chat_run):
    """A whole target-aware selection of chat rows with the SmolLM2 cut as the proxy (its own tokenizer and chat
    template), run as ``jobs/select.py`` on Hub ids (conftest's ``hub_chat_run``): (config, manifest)."""
    return hub_chat_run[:2]


def test_a_relative_model_path_reaches_the_train_workers_absolute(demo_small, smollm2_proxy, tmp_path):
    """A relative model path, as users write it: Ray Train's workers, which run in folders of their own, get it
    absolute."""
    from s2l_ray.pipeline import prepare_inputs

    cfg = load_config(None, {"output": str(tmp_path / "run"), "corpus.path": demo_small["train"],
                             "proxy.model": os.path.relpath(smollm2_proxy)})
    prepared, _ = prepare_inputs(cfg, RunDir(cfg.output))
    assert prepared.proxy.model == os.path.abspath(smollm2_proxy)


def test_stored_ids_are_the_chat_templates_rendering_with_every_assistant_turn_labelled(chat_run, chat_corpus,
                                                                                      smollm2_proxy):
    cfg, manifest = chat_run
    run = RunDir(cfg.output)
    tok = load_tokenizer(smollm2_proxy)
    stored = pq.read_table(run.corpus_files()).to_pylist()
    source = [json.loads(line) for line in open(chat_corpus)]
    assert len(stored) == 24 and len(manifest["corpus"]["files"]) == 3
    whole = 0
    for row, src in zip(stored, source):
        turns = json.loads(row["messages"])
        rendered = tok.apply_chat_template(turns, tokenize=True, return_dict=False)
        assert row["input_ids"] == rendered[:cfg.text.max_length] and row["truncated"] == (len(rendered) > 384)
        assert row["id"] == src["id"]
        if row["truncated"]:
            continue
        whole += 1
        answers = [t["content"] for t in turns if t["role"] == "assistant"]
        spans = row["spans"]
        assert [tok.decode(row["input_ids"][s:e]) for s, e in zip(spans[::2], spans[1::2])] == \
            [a + "<|im_end|>" for a in answers]
    assert whole >= 16 and sum(len(json.loads(r["messages"])) == 4 for r in stored if not r["truncated"]) >= 4


def test_trajectories_equal_the_real_models_loss_on_each_example_alone(chat_run, smollm2_proxy):
    cfg, _ = chat_run
    run = RunDir(cfg.output)
    tok = load_tokenizer(smollm2_proxy)
    rows = pq.read_table(run.corpus_files(), columns=["id", "prompt", "response", "messages"]).to_pylist()
    for t in (0, 1):
        model = load_model(os.path.join(run.proxy_checkpoints()[t]["path"], "model")).eval()
        table = pq.read_table(run.done_points()[t]["files"], partitioning=None).to_pydict()
        ref = reference_losses(model, tok, rows, cfg.text)  # model(labels=...) on one example at a time
        np.testing.assert_allclose(table["loss"], ref, rtol=0, atol=1e-5)
    first = pq.read_table(run.done_points()[0]["files"], partitioning=None).column("loss").to_numpy()
    last = pq.read_table(run.done_points()[1]["files"], partitioning=None).column("loss").to_numpy()
    assert not np.allclose(first, last)  # the checkpoints differ: the proxy trained
    # the target conversations: stored through the same chat template, scored with the same exact loss
    target = run.target
    rows = pq.read_table(target.corpus_files(), columns=["id", "prompt", "response", "messages"]).to_pylist()
    assert len(rows) == 5 and all(json.loads(r["messages"])[0]["role"] == "user" for r in rows)
    for t in (0, 1):
        model = load_model(os.path.join(run.proxy_checkpoints()[t]["path"], "model")).eval()
        table = pq.read_table(target.done_points()[t]["files"], partitioning=None).to_pydict()
        np.testing.assert_allclose(table["loss"], reference_losses(model, tok, rows, cfg.text), rtol=0, atol=1e-5)


def test_selected_chat_rows_keep_their_turns_and_the_hint_asks_for_the_target(chat_run, capsys):
    cfg, manifest = chat_run
    run = RunDir(cfg.output)
    rows = [json.loads(line) for line in open(run.selected_jsonl())]
    assert len(rows) == 8 and all(set(r) == {"id", "source", "messages"} for r in rows)
    assert manifest["selection"]["method"] == "s2l-target" and manifest["selection"]["target_rows"] == 5
    assert "--model /path/to/your/target-model" in pipeline.summary(run, cfg)
    assert f"target:       5 examples (gcd) -> {run.target.uri}" in pipeline.summary(run, cfg)


@pytest.fixture(scope="module")
def tuned(ray_local, chat_run, smollm2, tmp_path_factory):
    """SmolLM2 fine-tuned on the selected chat rows with ZeRO-2 (padded rows) and with ZeRO-3 (packed), in one
    sweep."""
    cfg, _ = chat_run
    root = tmp_path_factory.mktemp("tuned")
    base = FinetuneConfig(model=smollm2, corpus=CorpusConfig(path=cfg.output), epochs=1, micro_batch_size=2,
                          lr=1e-5, checkpoint_every=0, workers=Placement(count=2, cpus=0.5),
                          text=TextConfig(max_length=384))
    cfgs = [replace(base, output=str(root / f"zero{z}"), zero_stage=z, packed=z == 3) for z in (2, 3)]
    return finetune.run_many(cfgs, sweep_dir=str(root / "sweep"))


def test_zero2_and_zero3_fine_tune_the_real_model_and_export_it_with_its_chat_template(tuned, smollm2):
    from safetensors.torch import load_file

    base_tok = load_tokenizer(smollm2)
    for record in tuned:
        assert record["status"] == "done" and record["final_step"] == record["plan"]["total_steps"] == 2
        model_dir = Path(record["model"])
        tok = load_tokenizer(str(model_dir))
        assert tok.chat_template == base_tok.chat_template and tok.eos_token == "<|im_end|>"
        model = load_model(str(model_dir))
        assert model.config.num_hidden_layers == 30
        turns = [{"role": "user", "content": "What is 2+2?"}]
        ids = tok.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        assert "4" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    a, b = (load_file(str(Path(r["model"]) / "model.safetensors")) for r in tuned)
    base = load_file(os.path.join(smollm2, "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4  # the same run: either ZeRO stage, packed or not
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-6  # and it trained


def test_evaluation_of_the_real_model_on_gsm8k_and_chat_files(ray_local, smollm2, demo_small, tmp_path):
    """GSM8K's own schema (question, answer ending in #### N) with the default stop string, and a chat file
    prompted through the model's chat template."""
    gsm = EvaluateConfig(model=smollm2, output=str(tmp_path / "gsm"), max_new_tokens=40, limit=3, batch_size=3,
                         actors=Placement(count=1, cpus=0.5), corpus=CorpusConfig(path=demo_small["eval_gsm8k"]))
    metrics = evaluate.run(gsm)
    preds = [json.loads(line) for line in open(tmp_path / "gsm" / "predictions.jsonl")]
    golds = [json.loads(line)["answer"].rsplit("####", 1)[1].strip() for line in open(demo_small["eval_gsm8k"])][:3]
    assert [p["gold"] for p in preds] == golds and metrics["rows"] == 3
    assert all("Question:" not in p["generation"] for p in preds)  # generation stopped at the next question
    assert all(p["loss"] is not None and np.isfinite(p["loss"]) for p in preds)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in [
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "What is 10+5?"}, {"role": "assistant", "content": "15"}]}]))
    cm = evaluate.run(replace(gsm, output=str(tmp_path / "chat"), corpus=CorpusConfig(path=str(chat)), stop=[]))
    first = json.loads(open(tmp_path / "chat" / "predictions.jsonl").readline())
    assert first["correct"] and first["gold"] == "4", first  # the instruct model answers through its template
    assert cm["overall"]["correct"] >= 1
