"""K-means on the loss trajectories: fit on a sample, assign every example with Ray Data.

The fit runs in a Ray task (holding a GPU with cuML, so it runs where the GPUs are, not on a CPU
head) on at most ``k * max_points_per_centroid`` uniformly sampled rows (faiss's own default
cap, 256 per centroid), gathered from the trajectory files by Ray Data tasks: faiss on CPU,
cuML on GPU. Both start from k-means++ seeding (cuML's scalable k-means++;
for faiss, seeds drawn here, where plain faiss and the official code start from k random rows,
which often merges well-separated clusters). Every row is then assigned by Ray Data tasks, each
reading its corpus parts' trajectory files (``trajectories.map_parts``), so the N x T matrix is
never built (with cuML, each assignment task holds a GPU); ``distance`` is the squared L2
distance to the assigned centroid, per row.
``report.png`` draws the cluster means of the fit sample.

With ``per_source`` one k-means is fitted per corpus source (sources in name order), with
``min(k, rows of the source)`` clusters each, as the official code does; cluster ids are made
globally unique by offsetting each source's ids by the clusters of the sources before it.

``clusters.parquet`` rows follow the corpus idx order; its schema metadata records the corpus
fingerprint so that later stages can refuse a stale file.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import trajectories
from .config import ClusterConfig
from .layout import CENTROIDS_SCHEMA, CLUSTERS_SCHEMA, RunDir, exists, open_output_atomic, write_parquet_atomic

BACKENDS = ("auto", "faiss", "cuml")
ASSIGN_CHUNK = 65536  # rows per faiss search call inside assign()


class ClusteringError(ValueError):
    """Clustering cannot run with these settings or inputs."""


# backends -----------------------------------------------------------------------------------------

def cuml_usable() -> bool:
    """cuML imports and CUDA sees at least one GPU."""
    try:
        import cuml  # noqa: F401
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except (ImportError, OSError, RuntimeError):
        return False


def resolve_backend(name: str, wait: float = 300.0) -> str:
    """``faiss``, or ``cuml`` where the GPUs are: on a Ray cluster with GPUs, a task holding one GPU checks
    that cuML imports and sees it (the driver may run on a CPU head), waiting at most ``wait`` seconds for a
    GPU to be free; ``auto`` falls back to faiss, ``cuml`` is then an error. Without Ray, this process is asked."""
    import ray

    if name not in BACKENDS:
        raise ClusteringError(f"cluster.backend must be one of {list(BACKENDS)}, not {name!r}")
    if name == "faiss":
        return name
    if ray.is_initialized():
        gpus = ray.cluster_resources().get("GPU", 0)
        where = f"on a GPU node of this cluster ({gpus:g} GPUs)"
        usable = False
        if gpus > 0:
            probe = ray.remote(cuml_usable).options(num_cpus=0, num_gpus=1).remote()
            try:
                usable = ray.get(probe, timeout=wait)
            except ray.exceptions.GetTimeoutError:
                ray.cancel(probe, force=True)
                where = f"free within {wait:g} s on this cluster ({gpus:g} GPUs, all held)"
    else:
        usable, where = cuml_usable(), "in this process"
    if usable:
        return "cuml"
    if name == "cuml":
        raise ClusteringError(f"cluster.backend 'cuml' needs cuML (pip install 's2l-ray[gpu]') and a GPU {where}; "
                              "use 'faiss' or 'auto'")
    return "faiss"


def kmeans_pp_seeds(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ seeding: each next seed is a row drawn with probability proportional to its
    squared distance to the nearest seed so far (uniform when all distances are zero)."""
    rng = np.random.default_rng(seed)
    seeds = np.empty((k, x.shape[1]), np.float32)
    seeds[0] = x[rng.integers(len(x))]
    d2 = ((x - seeds[0]) ** 2).sum(1, dtype=np.float64)
    for i in range(1, k):
        total = d2.sum()
        seeds[i] = x[rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))]
        d2 = np.minimum(d2, ((x - seeds[i]) ** 2).sum(1, dtype=np.float64))
    return seeds


def _fit_faiss(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=max(1, -(-len(x) // k)))
    km.train(x, init_centroids=kmeans_pp_seeds(x, k, seed))
    return np.asarray(km.centroids, dtype=np.float32)


def _fit_cuml(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    from cuml.cluster import KMeans

    km = KMeans(n_clusters=k, max_iter=niter, random_state=seed, init="scalable-k-means++", output_type="numpy")
    km.fit(x)
    return np.asarray(km.cluster_centers_, dtype=np.float32)


FITTERS = {"faiss": _fit_faiss, "cuml": _fit_cuml}


# fit and assign (pure) ----------------------------------------------------------------------------

def check_k(k: int, n: int) -> None:
    if k < 1:
        raise ClusteringError(f"cluster.k must be >= 1, got {k}")
    if k > n:
        raise ClusteringError(f"cluster.k = {k} is larger than the number of examples ({n}); "
                              "lower cluster.k")


def sample_size(n: int, k: int, max_points_per_centroid: int) -> int:
    return min(n, k * max_points_per_centroid)


def fit_sample(n: int, k: int, max_points_per_centroid: int, seed: int) -> np.ndarray:
    """Sorted positions of at most ``k * max_points_per_centroid`` of n rows, uniformly at random."""
    m = sample_size(n, k, max_points_per_centroid)
    if m == n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, m, replace=False))


def fit(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, backend: str = "faiss",
        max_points_per_centroid: int = 256) -> np.ndarray:
    """Centroids [k, d] of k-means (``backend`` faiss or cuml, here) fitted on a seeded sample of at most
    ``k * max_points_per_centroid`` rows of x."""
    check_k(k, len(x))
    if max_points_per_centroid < 1:
        raise ClusteringError(f"cluster.max_points_per_centroid must be >= 1, got {max_points_per_centroid}")
    if backend not in FITTERS:
        raise ClusteringError(f"k-means backend must be one of {sorted(FITTERS)}, not {backend!r}")
    xs = np.ascontiguousarray(x[fit_sample(len(x), k, max_points_per_centroid, seed)], dtype=np.float32)
    return FITTERS[backend](xs, k, niter, seed)


def _assign_cuml(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import cupy as cp

    c = cp.asarray(centroids, dtype=cp.float32)
    norms = (c ** 2).sum(1)
    labels = np.empty(len(x), np.int32)
    dist = np.empty(len(x), np.float32)
    for s in range(0, len(x), ASSIGN_CHUNK):
        xb = cp.asarray(x[s:s + ASSIGN_CHUNK], dtype=cp.float32)
        lab = (norms[None, :] - 2 * xb @ c.T).argmin(1)
        labels[s:s + len(xb)] = cp.asnumpy(lab)
        dist[s:s + len(xb)] = cp.asnumpy(((xb - c[lab]) ** 2).sum(1))
    return labels, dist


def assign(x: np.ndarray, centroids: np.ndarray, backend: str = "faiss") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (int32) and squared L2 distance to it (float32) for every row of x."""
    if backend == "cuml":
        return _assign_cuml(x, centroids)
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(len(x), np.int32)
    dist = np.empty(len(x), np.float32)
    for s in range(0, len(x), ASSIGN_CHUNK):
        xb = np.ascontiguousarray(x[s:s + ASSIGN_CHUNK], dtype=np.float32)
        lab = index.search(xb, 1)[1][:, 0].astype(np.int32)
        labels[s:s + len(xb)] = lab
        dist[s:s + len(xb)] = ((xb - centroids[lab]) ** 2).sum(axis=1)
    return labels, dist


def assign_grouped(x: np.ndarray, groups: np.ndarray, centroids: list[np.ndarray], offsets: np.ndarray,
                   backend: str = "faiss") -> tuple[np.ndarray, np.ndarray]:
    """``assign`` within each row's group (``centroids[g]``), cluster ids shifted by ``offsets[g]``."""
    present = np.flatnonzero(np.bincount(groups, minlength=len(centroids)))
    if len(present) == 1:  # one group: no row gathering
        labels, dist = assign(x, centroids[present[0]], backend)
        return labels + np.int32(offsets[present[0]]), dist
    labels = np.empty(len(x), np.int32)
    dist = np.empty(len(x), np.float32)
    for g in present:
        rows = np.flatnonzero(groups == g)
        lab, d = assign(x[rows], centroids[g], backend)
        labels[rows], dist[rows] = lab + offsets[g], d
    return labels, dist


# parallel assignment with Ray Data -----------------------------------------------------------------

def _assign_part(run: RunDir, plan: trajectories.Plan, j: int, centroids: list[np.ndarray], offsets: np.ndarray,
                 names: list[str], backend: str) -> pa.Table:
    """Part j's rows to (idx, cluster, distance); ``names`` (sorted sources) when one k-means per source."""
    part = plan.parts[j]
    blocks, replaced = trajectories.read_part(run, plan, j)
    if names:
        source = pq.read_table(part.corpus, columns=["source"], filesystem=run.fs).column("source")
        groups = pc.index_in(source, value_set=pa.array(names))
        if groups.null_count:
            raise ClusteringError(f"{part.corpus}: sources outside the clustered ones {names}")
        groups = groups.to_numpy(zero_copy_only=False).astype(np.int32)
    else:
        groups = np.zeros(part.rows, np.int32)
    labels, dist = assign_grouped(blocks["loss"], groups, centroids, offsets, backend)
    count = np.zeros(part.rows, np.int64)
    count[:1] = replaced
    return pa.table({"idx": np.arange(part.start, part.start + part.rows), "cluster": labels, "distance": dist,
                     "replaced": count})


def assign_ray(plan: trajectories.Plan, centroids: list[np.ndarray], offsets: np.ndarray | None = None,
               names: list[str] | None = None, *, num_cpus: float = 1.0,
               backend: str = "faiss") -> tuple[np.ndarray, np.ndarray, int]:
    """Every row's cluster and distance, computed part by part in Ray Data tasks (one GPU each with cuML);
    and the non-finite count. Only the results (idx, cluster, distance: 16 bytes a row) come back.
    """
    offsets = np.zeros(len(centroids), np.int64) if offsets is None else offsets
    labels = np.full(plan.n, -1, np.int32)
    dist = np.empty(plan.n, np.float32)
    replaced = 0
    for table in trajectories.map_parts(plan, _assign_part, {"centroids": centroids, "offsets": offsets,
                                                              "names": names or [], "backend": backend},
                                        num_cpus=num_cpus, num_gpus=1 if backend == "cuml" else 0):
        idx = table.column("idx").to_numpy()
        labels[idx], dist[idx] = table.column("cluster").to_numpy(), table.column("distance").to_numpy()
        replaced += int(table.column("replaced").to_numpy().sum())
    if (labels < 0).any():
        raise ClusteringError(f"Ray Data assignment returned no result for {int((labels < 0).sum())} rows")
    return labels, dist, replaced


# the run-level stage ------------------------------------------------------------------------------

def codes_of(col: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Integer codes (int32) of a string (or dictionary) column and its distinct values in sorted order."""
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)
    enc = col.unify_dictionaries().combine_chunks()
    names = enc.dictionary.to_pylist()
    rank = np.empty(len(names), np.int32)
    rank[np.argsort(names)] = np.arange(len(names), dtype=np.int32)
    return rank[enc.indices.to_numpy()], sorted(names)


def corpus_sources(run: RunDir) -> tuple[np.ndarray, list[str]]:
    """Each corpus row's source code (idx order) and the source names."""
    return codes_of(pq.read_table(run.corpus_files(), columns=["source"], filesystem=run.fs,
                                  read_dictionary=["source"]).column("source"))


def cluster_means(x: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """The mean trajectory of each cluster [K, T'] (NaN for an empty cluster)."""
    sizes = np.bincount(labels, minlength=n_clusters).astype(np.float64)
    sums = np.stack([np.bincount(labels, weights=x[:, j], minlength=n_clusters) for j in range(x.shape[1])], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / sizes[:, None]


def source_purity(labels: np.ndarray, sources: np.ndarray) -> float:
    """The share of rows whose cluster's most common source is their own: 1 when clusters are just
    sources (or parts of one), near the largest source's share when they ignore sources."""
    table = np.zeros((int(labels.max()) + 1, int(sources.max()) + 1), np.int64)
    np.add.at(table, (labels, sources), 1)
    return float(table.max(axis=1).sum() / len(labels))


def write_clusters(run: RunDir, labels: np.ndarray, dist: np.ndarray, fingerprint: str | None,
                   dest: RunDir | None = None) -> None:
    """Stream ``clusters.parquet`` (into ``dest``, default ``run``) corpus file by corpus file (ids and sources
    read from ``run``'s corpus)."""
    schema = CLUSTERS_SCHEMA.with_metadata({"corpus_fingerprint": fingerprint or ""})
    start = 0
    dest = dest or run
    with open_output_atomic(dest.fs, dest.clusters) as f, pq.ParquetWriter(f, schema, compression="zstd") as w:
        for path in run.corpus_files():
            part = pq.read_table(path, columns=["id", "source"], filesystem=run.fs)
            end = start + part.num_rows
            if end > len(labels):
                raise ClusteringError(f"{path}: the corpus files hold more rows than the manifest's {len(labels)}")
            w.write_table(pa.table({"id": part.column("id"), "source": part.column("source"),
                                    "cluster": labels[start:end], "distance": dist[start:end]}, schema=schema))
            start = end
        if start != len(labels):  # inside the block: no file is published
            raise ClusteringError(f"the corpus files hold {start} rows, the manifest {len(labels)}")


def write_centroids(dest: RunDir, centroids: list[np.ndarray], offsets: np.ndarray, names: list[str],
                    fingerprint: str | None) -> None:
    """``centroids.parquet``: every cluster's centroid and the source whose k-means it belongs to."""
    rows = [(int(o) + c, names[g] if names else None, centroids[g][c].tolist())
            for g, o in enumerate(offsets) for c in range(len(centroids[g]))]
    schema = CENTROIDS_SCHEMA.with_metadata({"corpus_fingerprint": fingerprint or ""})
    write_parquet_atomic(dest.fs, dest.centroids, pa.table(
        {"cluster": [r[0] for r in rows], "source": [r[1] for r in rows], "centroid": [r[2] for r in rows]},
        schema=schema))


def read_centroids(run: RunDir) -> tuple[np.ndarray, list[str | None]]:
    """Centroids ``[K, T']`` (row k: cluster k) and each one's source (None for one k-means over all rows)."""
    if not exists(run.fs, run.centroids):
        raise ClusteringError(f"{run.centroids} is missing: run clustering first")
    table = pq.read_table(run.centroids, filesystem=run.fs)
    order = np.argsort(table.column("cluster").to_numpy())
    cents = np.asarray(table.column("centroid").to_pylist(), np.float32)[order]
    sources = table.column("source").to_pylist()
    return cents, [sources[i] for i in order]


def nearest(x: np.ndarray, centroids: np.ndarray, owners: list[str | None], sources: list[str | None],
            backend: str = "faiss") -> np.ndarray:
    """Each row's nearest cluster: among its own source's clusters when its source has some (clusters fitted
    per source), else among all."""
    labels = assign(x, centroids, backend)[0].astype(np.int64)
    owned = {s for s in owners if s is not None}
    for s in set(sources) & owned:
        rows = np.flatnonzero(np.asarray(sources, dtype=object) == s)
        ids = np.flatnonzero(np.asarray(owners, dtype=object) == s)
        labels[rows] = ids[assign(x[rows], centroids[ids], backend)[0]]
    return labels


def _fit_groups(samples: list[np.ndarray], ks: list[int], niter: int, seed: int, backend: str,
                max_points_per_centroid: int) -> tuple[list[np.ndarray], dict]:
    """Ray task (a GPU with cuML): one k-means per group's sample; the centroids and where they were fitted."""
    import ray

    centroids = [fit(x, k, niter=niter, seed=seed, backend=backend, max_points_per_centroid=max_points_per_centroid)
                 for x, k in zip(samples, ks)]
    return centroids, {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


@contextlib.contextmanager
def _timed(timings: dict, name: str) -> Iterator[None]:
    start = time.time()
    yield
    timings[name] = round(time.time() - start, 3)


def cluster_run(run: RunDir, cfg: ClusterConfig, seed: int, *, num_points: int | None = None,
                num_cpus: float = 1.0, report: bool = True, dest: RunDir | None = None) -> dict:
    """Trajectories to ``clusters.parquet`` (and ``report.png``), in ``dest`` (default: ``run``, whose corpus and
    trajectories are read); returns statistics for the manifest.

    ``num_points`` is the proxy's T (None: inferred from the done points). The fit sample is
    gathered and every row assigned by Ray Data tasks reserving ``num_cpus`` each; the driver
    holds the sample and one cluster id and distance per row.
    """
    import ray

    timings: dict[str, float] = {}
    backend = resolve_backend(cfg.backend)
    with _timed(timings, "trajectories"):
        plan = trajectories.plan(run, cfg, num_points)
        n = plan.n
        codes, sources = corpus_sources(run)
        if cfg.per_source:
            names = sources
            groups = [np.flatnonzero(codes == g) for g in range(len(names))]
            ks = [min(cfg.k, len(r)) for r in groups]
        else:
            check_k(cfg.k, n)
            names, groups, ks = [], [np.arange(n)], [cfg.k]
    if cfg.max_points_per_centroid < 1:
        raise ClusteringError(f"cluster.max_points_per_centroid must be >= 1, got {cfg.max_points_per_centroid}")
    offsets = np.concatenate([[0], np.cumsum(ks)[:-1]]).astype(np.int64)
    with _timed(timings, "fit"):
        samples = [r[fit_sample(len(r), kg, cfg.max_points_per_centroid, seed)] for kg, r in zip(ks, groups)]
        xs = trajectories.gather(plan, np.concatenate(samples), num_cpus=num_cpus)
        bounds = np.cumsum([0] + [len(s) for s in samples])
        task = ray.remote(_fit_groups).options(num_cpus=num_cpus, num_gpus=1 if backend == "cuml" else 0)
        centroids, fitted_by = ray.get(task.remote([xs[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])], ks,
                                                   cfg.niter, seed, backend, cfg.max_points_per_centroid))
    with _timed(timings, "assign"):
        labels, dist, nan_count = assign_ray(plan, centroids, offsets, names, num_cpus=num_cpus, backend=backend)
    fingerprint = run.read_manifest().get("corpus", {}).get("fingerprint")
    with _timed(timings, "write"):
        write_clusters(run, labels, dist, fingerprint, dest)
        write_centroids(dest or run, centroids, offsets, names, fingerprint)
    n_clusters = int(sum(ks))
    sizes = np.bincount(labels, minlength=n_clusters)
    if report:
        from .report import write_report

        sample_rows = np.concatenate(samples)
        with _timed(timings, "report"):
            write_report(dest or run, cluster_means(xs, labels[sample_rows], n_clusters), sizes, list(plan.steps))
    stats = {"backend": backend, "fitted_by": fitted_by, "k": n_clusters, "per_source": cfg.per_source, "rows": n,
             "points": list(plan.points), "steps": list(plan.steps), "sample_size": len(xs),
             "inertia": float(dist.sum(dtype=np.float64)), "cluster_sizes": sizes.tolist(),
             "empty_clusters": int((sizes == 0).sum()), "nan_count": nan_count,
             "source_purity": source_purity(labels, codes),
             "fingerprint_checked": plan.fingerprint_checked, "timings": timings}
    if cfg.per_source:
        stats["sources"] = {s: {"rows": len(r), "k": kg, "first_cluster": int(o)}
                            for s, r, kg, o in zip(names, groups, ks, offsets)}
    return stats
