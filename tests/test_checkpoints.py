"""Your own checkpoints as the trajectory (``--checkpoints``): a training output's ``checkpoint-N`` folders, used in
step order with no proxy trained; every point's losses are each checkpoint's exact loss on each example alone."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from s2l_ray import pipeline
from s2l_ray.config import ConfigError, CorpusConfig, TextConfig, load_config
from s2l_ray.corpus import normalise
from s2l_ray.layout import LayoutError, RunDir
from s2l_ray.models import load_tokenizer, own_checkpoints, preset_config, save_model
from s2l_ray.scoring import reference_losses

STEPS = (10, 2, 6)  # written out of order: the folders' numbers decide


@pytest.fixture(scope="module")
def trainer_output(demo_small, tmp_path_factory):
    """A Trainer-style output folder: checkpoint-2, -6 and -10, each a model with its own weights and the tokenizer."""
    out = tmp_path_factory.mktemp("trainer-output")
    tok = load_tokenizer(demo_small["tokenizer"])
    for i, step in enumerate(STEPS):
        torch.manual_seed(i)
        save_model(AutoModelForCausalLM.from_config(preset_config("tiny", tok)), tok, str(out / f"checkpoint-{step}"))
    (out / "runs").mkdir()  # what else a training output holds is not a checkpoint
    return out


def config(demo_small, out, checkpoints):
    return load_config(None, {"output": str(out), "corpus.path": demo_small["train"], "proxy.checkpoints": checkpoints,
                              "cluster.k": 3, "select.budgets": [12], "corpus.part_rows": 16})


def test_a_training_outputs_checkpoints_are_the_trajectory(ray_local, demo_small, trainer_output, tmp_path):
    m = pipeline.select(config(demo_small, tmp_path / "run", [str(trainer_output)]))
    run = RunDir(str(tmp_path / "run"))
    assert [rec["step"] for _, rec in sorted(run.done_points().items())] == [2, 6, 10]
    assert m["proxy"]["trained"] is False and sorted(p.name for p in (tmp_path / "run" / "proxy").iterdir()) == \
        ["_checkpoints.json"]  # no Ray Train run
    assert m["config"]["proxy"]["num_points"] == 3 and m["selection"]["budgets"]["12"]["selected"] == 12
    rows = pq.read_table(run.corpus_files()).to_pylist()[::7]
    tok = load_tokenizer(str(trainer_output / "checkpoint-2"))
    norm = [normalise({k: r[k] for k in ("id", "source", "prompt", "response")}, CorpusConfig()) for r in rows]
    for t, step in enumerate((2, 6, 10)):
        model = AutoModelForCausalLM.from_pretrained(str(trainer_output / f"checkpoint-{step}")).eval()
        alone = reference_losses(model, tok, norm, TextConfig())
        got = dict(zip(*pq.read_table(run.done_points()[t]["files"], partitioning=None, columns=["id", "loss"])
                       .to_pydict().values()))
        np.testing.assert_allclose([got[r["id"]] for r in rows], alone, rtol=0, atol=1e-5)
    with pytest.raises(LayoutError, match="other checkpoints"):  # never mixed with another set's points
        pipeline.select(config(demo_small, tmp_path / "run", [str(trainer_output / "checkpoint-2"),
                                                              str(trainer_output / "checkpoint-6")]))


def test_model_dirs_in_their_order_and_what_is_not_a_checkpoint(trainer_output, tmp_path):
    dirs = [str(trainer_output / "checkpoint-2"), str(trainer_output / "checkpoint-10")]
    assert own_checkpoints(dirs) == [(2, dirs[0]), (10, dirs[1])]
    with pytest.raises(ConfigError, match="not increasing"):
        own_checkpoints(dirs[::-1])
    with pytest.raises(ConfigError, match=r"runs is neither a model directory .* nor a training output"):
        own_checkpoints([str(trainer_output / "runs")])
    assert json.dumps(own_checkpoints([str(trainer_output)]))  # plain (step, path) pairs, as the stage key takes them
