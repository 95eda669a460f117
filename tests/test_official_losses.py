"""The official S2L code's ``losses.pt`` files as the trajectory (``--losses``): a training output whose
``checkpoint-N`` folders each hold one (a list of 0-d tensors, one per example of the JSON-array data file, as its
``get_trajectories.py`` saves them), imported in step order with no proxy trained and each stored row given the
loss of its own record."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from s2l_ray import pipeline
from s2l_ray.config import ConfigError, load_config
from s2l_ray.layout import RunDir
from s2l_ray.official_losses import loss_files

STEPS = (500, 1000, 1500)
EMPTY = 7  # the record with no response: dropped here, its loss taken by no stored row
NAN = 11  # a NaN loss, kept as NaN in the trajectory


def official_losses(n: int, t: int) -> list[torch.Tensor]:
    """What the official code saves: one 0-d tensor per example, distinct per example and checkpoint."""
    values = torch.arange(n, dtype=torch.float32) * 0.01 + t
    values[NAN] = float("nan")
    return [v.detach().clone() for v in values]


@pytest.fixture(scope="module")
def official_run(demo_small, tmp_path_factory):
    """The data file the official code read (one JSON array of Alpaca records with a source field) and its training
    output: checkpoint-N folders with the tokenizer and a losses.pt each (written out of step order)."""
    root = tmp_path_factory.mktemp("official")
    rows = [json.loads(line) for line in open(demo_small["train"])]
    records = [{"instruction": r["prompt"], "input": "", "output": "" if i == EMPTY else r["response"],
                "source": r["source"]} for i, r in enumerate(rows)]
    (root / "math.json").write_text(json.dumps(records, indent=4))
    for t, step in sorted(enumerate(STEPS), key=lambda x: -x[1]):
        shutil.copytree(demo_small["tokenizer"], root / "output" / f"checkpoint-{step}")
        torch.save(official_losses(len(records), t), root / "output" / f"checkpoint-{step}" / "losses.pt")
    (root / "output" / "runs").mkdir()
    return root, records


def config(root, out, **extra):
    return load_config(None, {"output": str(out), "corpus.path": str(root / "math.json"),
                              "proxy.losses": [str(root / "output")], "cluster.k": 3, "select.budgets": [12],
                              "corpus.part_rows": 16, **extra})


def test_the_official_losses_are_each_rows_own_and_select(ray_local, official_run, tmp_path):
    root, records = official_run
    m = pipeline.select(config(root, tmp_path / "run"))
    run = RunDir(str(tmp_path / "run"))
    assert m["proxy"]["trained"] is False and not (tmp_path / "run" / "proxy").exists()
    assert m["config"]["proxy"]["num_points"] == 3 and m["selection"]["budgets"]["12"]["selected"] == 12
    assert m["config"]["text"]["tokenizer"] == str(root / "output" / "checkpoint-500")  # the one beside the losses
    assert m["corpus"]["inputs"] == [{"uri": str(root / "math.json"), "format": "json", "records": len(records)}]
    assert m["corpus"]["rows"] == len(records) - 1 and m["corpus"]["dropped"]["empty_response"] == 1
    stored = pq.read_table(run.corpus_files(), columns=["id", "origin_row", "prompt"]).to_pylist()
    assert [r["prompt"] for r in stored] == [r["instruction"] for i, r in enumerate(records) if i != EMPTY]
    done = run.done_points()
    assert [done[t]["step"] for t in range(3)] == list(STEPS)
    for t in range(3):
        got = pq.read_table(done[t]["files"], partitioning=None).to_pylist()
        assert [g["id"] for g in got] == [r["id"] for r in stored]
        expected = np.array([official_losses(len(records), t)[r["origin_row"]].item() for r in stored], np.float32)
        np.testing.assert_array_equal(np.array([g["loss"] for g in got], np.float32), expected)  # NaN where it was
        assert all(g["confidence"] is None and g["checkpoint"] == t for g in got)
    assert np.isnan(expected[NAN - 1]) and not np.isnan(np.delete(expected, NAN - 1)).any()
    assert m["clusters"]["nan_count"] == 3  # the one NaN row, at each point, clustered with cluster.nan_value
    assert (tmp_path / "run" / "selected.original.json").is_file() and (tmp_path / "run" / "report.html").is_file()
    again = pipeline.select(config(root, tmp_path / "run"))  # every point reused, the same subset
    assert run.done_points() == done and again["selection"]["budgets"] == m["selection"]["budgets"]


def test_a_count_that_is_not_the_data_files_is_refused(ray_local, official_run, tmp_path):
    root, records = official_run
    short = tmp_path / "short" / "checkpoint-3"
    short.mkdir(parents=True)
    torch.save(official_losses(len(records), 0)[:-1], short / "losses.pt")
    cfg = config(root, tmp_path / "run", **{"proxy.losses": [str(short / "losses.pt")],
                                            "text.tokenizer": str(root / "output" / "checkpoint-500")})
    with pytest.raises(ConfigError, match=rf"losses\.pt holds {len(records) - 1} losses, the corpus inputs "
                                          rf"{len(records)} records \(.*math\.json\)"):
        pipeline.select(cfg)
    assert not RunDir(str(tmp_path / "run")).done_points()


def test_what_losses_alone_cannot_do_is_refused_before_any_work(official_run, tmp_path):
    root, _ = official_run
    assert [s for s, _ in loss_files([str(root / "output")])] == list(STEPS)
    with pytest.raises(ConfigError, match=r"runs is neither losses\.pt or a folder holding it"):
        loss_files([str(root / "output" / "runs")])
    for extra, message in (({"select.target": str(root / "math.json")}, "losses.pt files hold none"),
                           ({"select.method": "variability"}, "gold-token probability"),
                           ({"proxy.model": str(root / "output" / "checkpoint-500")}, "give one")):
        with pytest.raises(ConfigError, match=message):
            pipeline.select(config(root, tmp_path / "never", **extra))
        assert not (tmp_path / "never").exists()
