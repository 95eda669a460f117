"""clustering: faiss fit and assignment, Ray Data assignment, the run-level stage, the report."""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from s2l_ray import clustering as cl
from s2l_ray import trajectories as tr
from s2l_ray.report import png as report
from s2l_ray.config import ClusterConfig
from s2l_ray.layout import CLUSTERS_SCHEMA, RunDir


def blobs(k: int, per: int, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k well-separated Gaussian blobs (centres 10 apart, sd 0.1), rows shuffled: (x, true labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (k, d)).astype(np.float32)
    truth = rng.permutation(np.repeat(np.arange(k), per))
    return (centres[truth] + rng.normal(0, 0.1, (len(truth), d))).astype(np.float32), truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """a and b are equal up to a permutation of labels."""
    pairs = np.unique(np.stack([a, b], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def test_faiss_recovers_separated_clusters():
    x, truth = blobs(k=6, per=400)
    centroids = cl.fit(x, 6, niter=20, seed=0, backend="faiss")
    labels, dist = cl.assign(x, centroids)
    assert centroids.shape == (6, 12)
    assert same_partition(labels, truth)
    assert dist.max() < 12 * 0.1 ** 2 * 4  # every row lies close to its centre


def test_assign_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5000, 12)).astype(np.float32)
    c = rng.normal(size=(17, 12)).astype(np.float32)
    labels, dist = cl.assign(x, c)
    full = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, full.argmin(1))
    np.testing.assert_allclose(dist, full.min(1), rtol=1e-5)
    assert labels.dtype == np.int32 and dist.dtype == np.float32


def test_fit_sample_is_capped_seeded_and_unique():
    s = cl.fit_sample(10_000, 4, 256, seed=3)
    assert len(s) == 1024 and len(np.unique(s)) == 1024 and (np.diff(s) > 0).all()
    assert np.array_equal(s, cl.fit_sample(10_000, 4, 256, seed=3))
    assert not np.array_equal(s, cl.fit_sample(10_000, 4, 256, seed=4))
    assert np.array_equal(cl.fit_sample(500, 4, 256, seed=3), np.arange(500))


def test_fit_is_deterministic_by_seed():
    x, _ = blobs(k=8, per=300, seed=2)
    a = cl.fit(x, 5, seed=7, max_points_per_centroid=100)
    assert np.array_equal(a, cl.fit(x, 5, seed=7, max_points_per_centroid=100))


def test_bad_k_and_backend_are_errors():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(cl.ClusteringError, match="cluster.k = 11 is larger than the number of examples"):
        cl.fit(x, 11)
    with pytest.raises(cl.ClusteringError, match="cluster.k must be >= 1"):
        cl.fit(x, 0)
    with pytest.raises(cl.ClusteringError, match="cluster.backend must be one of"):
        cl.resolve_backend("sklearn")


@pytest.mark.skipif(cl.cuml_usable(), reason="cuML and a GPU are present")
def test_without_cuml_auto_is_faiss_and_cuml_is_an_error():
    assert cl.resolve_backend("auto") == "faiss"
    with pytest.raises(cl.ClusteringError, match="needs cuML"):
        cl.resolve_backend("cuml")


PROBE = """
import ray
from s2l_ray import clustering as cl
ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)

@ray.remote(num_gpus=1)
class Holder:
    def ready(self):
        return True

holder = Holder.remote()
assert ray.get(holder.ready.remote())  # the cluster's only GPU is held
print("auto:", cl.resolve_backend("auto", wait=3))
try:
    cl.resolve_backend("cuml", wait=3)
except cl.ClusteringError as e:
    print("cuml:", e)
"""


def test_the_cuml_probe_waits_for_a_free_gpu_only_so_long():
    """A Ray whose one GPU (declared) is held by an actor: ``auto`` falls back to faiss after the wait, ``cuml``
    is an error saying no GPU came free, instead of waiting for ever."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "auto: faiss" in proc.stdout
    assert "cuml: cluster.backend 'cuml' needs cuML" in proc.stdout and "free within 3 s" in proc.stdout


@pytest.fixture
def synthetic_run(tmp_path) -> RunDir:
    run = RunDir(str(tmp_path / "run"))
    tr.write_synthetic_run(run, 3000, 6, num_sources=3, num_patterns=8, chunk_rows=1100, seed=1)
    return run


def test_cluster_run_writes_clusters_in_corpus_order(ray_local, synthetic_run):
    run = synthetic_run
    stats = cl.cluster_run(run, ClusterConfig(k=8), seed=0, num_points=6)
    table = pq.read_table(run.clusters)
    assert table.schema.remove_metadata() == CLUSTERS_SCHEMA
    assert table.schema.metadata[b"corpus_fingerprint"].decode() == run.read_manifest()["corpus"]["fingerprint"]
    corpus = pq.read_table(run.corpus_files(), columns=["id", "source"])
    assert table.column("id").equals(corpus.column("id")) and table.column("source").equals(corpus.column("source"))
    sizes = np.bincount(table.column("cluster").to_numpy(), minlength=8)
    assert stats["cluster_sizes"] == sizes.tolist() and sum(stats["cluster_sizes"]) == 3000
    assert stats["backend"] == "faiss" and stats["k"] == 8 and stats["sample_size"] == 2048
    assert stats["inertia"] == pytest.approx(float(table.column("distance").to_numpy().sum(dtype=np.float64)), rel=1e-6)
    assert stats["points"] == list(range(6)) and stats["nan_count"] == 0
    assert set(stats["timings"]) == {"trajectories", "fit", "assign", "write", "report"}
    with open(run.report, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cluster_run_per_source_offsets_and_clips_k(ray_local, synthetic_run):
    run = synthetic_run
    sources = run.read_manifest()["corpus"]["sources"]
    k = min(sources.values()) + 5  # larger than the smallest source
    stats = cl.cluster_run(run, ClusterConfig(k=k, per_source=True), seed=0, report=False)
    table = pq.read_table(run.clusters)
    src = np.array(table.column("source").to_pylist())
    labels = table.column("cluster").to_numpy()
    smallest = min(sources, key=sources.get)
    assert stats["sources"][smallest]["k"] == sources[smallest]
    first = 0
    for name in sorted(sources):
        info = stats["sources"][name]
        assert info["first_cluster"] == first and info["rows"] == sources[name]
        mine = labels[src == name]
        assert mine.min() >= first and mine.max() < first + info["k"]
        first += info["k"]
    assert stats["k"] == first and "report" not in stats["timings"]


def full_matrix(run: RunDir, num_points: int) -> np.ndarray:
    plan = tr.plan(run, ClusterConfig(), num_points)
    return np.concatenate([tr.read_part(run, plan, j)[0]["loss"] for j in range(len(plan.parts))])


def test_ray_assignment_equals_single_process(ray_local, synthetic_run):
    run = synthetic_run
    cl.cluster_run(run, ClusterConfig(k=8, max_points_per_centroid=100), seed=3, num_points=6, report=False)
    x = full_matrix(run, 6)  # the reference: the whole matrix in this process
    ref_labels, ref_dist = cl.assign(x, cl.fit(x, 8, seed=3, max_points_per_centroid=100))
    table = pq.read_table(run.clusters)
    np.testing.assert_array_equal(table.column("cluster").to_numpy(), ref_labels)
    np.testing.assert_array_equal(table.column("distance").to_numpy(), ref_dist)


def test_ray_per_source_assignment_equals_single_process(ray_local, synthetic_run):
    run = synthetic_run
    cl.cluster_run(run, ClusterConfig(k=5, per_source=True, max_points_per_centroid=50), seed=1, report=False)
    x = full_matrix(run, 6)
    codes, names = cl.corpus_sources(run)
    cents = [cl.fit(x[codes == g], 5, seed=1, max_points_per_centroid=50) for g in range(len(names))]
    ref_labels, ref_dist = cl.assign_grouped(x, codes, cents, np.arange(len(names)) * 5)
    table = pq.read_table(run.clusters)
    np.testing.assert_array_equal(table.column("cluster").to_numpy(), ref_labels)
    np.testing.assert_array_equal(table.column("distance").to_numpy(), ref_dist)


def test_cluster_run_with_k_above_n_fails_before_work(ray_local, synthetic_run):
    with pytest.raises(cl.ClusteringError, match="cluster.k = 3001 is larger"):
        cl.cluster_run(synthetic_run, ClusterConfig(k=3001), seed=0)


def test_report_draws_a_spread_subset_of_large_k():
    sizes = np.arange(100)  # cluster 0 is empty
    shown = report.curves_to_draw(sizes, max_curves=20)
    assert len(shown) == 20 and len(set(shown.tolist())) == 20
    assert shown[0] == 99 and shown[-1] == 1 and 0 not in shown
    png = report.plot_clusters(np.random.default_rng(0).random((100, 12)), sizes, list(range(12)))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_source_purity_hand_worked():
    # cluster 0: sources a a b (majority 2), cluster 1: b b (2), cluster 2: c (1) -> (2 + 2 + 1) / 6
    labels = np.array([0, 0, 0, 1, 1, 2])
    sources = np.array([0, 0, 1, 1, 1, 2])
    assert cl.source_purity(labels, sources) == pytest.approx(5 / 6)
    assert cl.source_purity(np.zeros(4, np.int64), np.array([0, 1, 1, 1])) == 0.75  # one cluster: the largest source
