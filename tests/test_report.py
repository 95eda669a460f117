"""report.html: its numbers against the run's own files, its size bounded whatever the corpus, and the page as
headless Chromium shows it (no console error, every chart drawn, the tables' numbers)."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from helpers import open_page
from s2l_ray import trajectories as tr
from s2l_ray.clustering import cluster_run
from s2l_ray.config import ClusterConfig, SelectConfig
from s2l_ray.layout import RunDir
from s2l_ray.report import data as report_data
from s2l_ray.report import write_html
from s2l_ray.selection.stage import select_run


@pytest.fixture(scope="module")
def synthetic(ray_local, tmp_path_factory):
    """A synthetic run of 30,000 rows (4 sources, 6 points) clustered per source (K=8 each), two budgets."""
    run = RunDir(str(tmp_path_factory.mktemp("report") / "run"))
    tr.write_synthetic_run(run, 30_000, 6, num_sources=4, chunk_rows=8_000, seed=3)
    ccfg = ClusterConfig(k=8, per_source=True)
    run.update_manifest(clusters=cluster_run(run, ccfg, seed=0, report=False))
    run.update_manifest(selection=select_run(run, SelectConfig(budgets=[0.1, 600]), ccfg, seed=0))
    return run


def test_report_numbers_match_the_run_files(synthetic):
    report = report_data.collect(synthetic)
    clusters = pq.read_table(synthetic.clusters).to_pandas()
    assert report["rows"] == len(clusters) == 30_000 and report["budgets"] == ["3000", "600"]
    sizes = clusters.groupby("cluster").size()
    assert [c["size"] for c in report["clusters"]] == [int(sizes.get(c, 0)) for c in range(32)]
    for b in ("3000", "600"):
        sel = pq.read_table(synthetic.selection(int(b))).to_pandas()
        picked = sel.groupby("cluster").size()
        assert [c["selected"][b] for c in report["clusters"]] == [int(picked.get(c, 0)) for c in range(32)]
        by_source = sel.groupby("source").size()
        assert {s["source"]: s["selected"][b] for s in report["sources"]} == by_source.to_dict()
    assert {s["source"]: s["corpus"] for s in report["sources"]} == clusters.groupby("source").size().to_dict()
    for c in report["clusters"]:  # the source mix, and the examples: the rows nearest the centroid
        members = clusters[clusters["cluster"] == c["cluster"]]
        assert c["mix"] == members.groupby("source").size().to_dict()
        nearest = members.sort_values(["distance"], kind="stable").head(report_data.EXAMPLES)["id"].tolist()
        assert [e["id"] for e in c["examples"]] == nearest
        assert len(c["mean"]) == len(c["std"]) == 6
    dm = report["data_map"]
    assert len(dm["id"]) == sum(min(int(n), report_data.SAMPLE_PER_CLUSTER) for n in sizes)
    assert all(0 <= v <= 1 for v in dm["confidence"]) and set(dm["selected"]) == {"3000", "600"}
    assert report_data.collect(synthetic)["data_map"]["id"] == dm["id"]  # the same sample every time


def test_the_page_stays_small_whatever_the_corpus(synthetic):
    size = os.path.getsize(write_html(synthetic))
    assert size < 3_000_000  # BokehJS inline (about 2 MB) and aggregates: 30,000 rows or ten million alike


@pytest.mark.slow
def test_the_demo_report_in_headless_chromium(tracked_selection, tmp_path):
    """A real selection run on the demo (the session's); its report.html opens with no console error, draws every
    chart, and its cluster table shows the run's numbers."""
    cfg, _, _ = tracked_selection
    run = RunDir(cfg.output)
    path = run.path("report.html")
    # S2L_REPORT_SCREENSHOT=docs/report.png keeps the screenshot (the README's picture is made this way)
    page = open_page(path, os.environ.get("S2L_REPORT_SCREENSHOT") or tmp_path / "report.png")
    assert page["errors"] == []
    assert page["figures"] == page["drawn"] == 5  # trajectories, cluster sizes, sources, data map, proxy loss
    clusters = pq.read_table(run.clusters).to_pandas()
    sel = pq.read_table(run.selection()).to_pandas()
    sizes, picked = clusters.groupby("cluster").size(), sel.groupby("cluster").size()
    shown = page["tables"][0]  # the cluster table: cluster, rows, selected, ...
    for cells in shown:
        c = int(cells[0])
        assert int(cells[1].replace(",", "")) == sizes[c] and int(cells[2].replace(",", "")) == picked.get(c, 0)
    assert len(shown) == len(sizes)
    manifest = json.loads(open(run.manifest).read())
    assert manifest["stages"]["selection"] and os.path.getsize(path) < 3_000_000
