"""Summaries and plots: cluster-mean trajectories and sizes (``report.png``); the benchmark's table and plot."""
from __future__ import annotations

import io

import numpy as np

from .layout import RunDir, write_bytes_atomic

MAX_CURVES = 20  # cluster-mean trajectories drawn at most


def curves_to_draw(sizes: np.ndarray, max_curves: int = MAX_CURVES) -> np.ndarray:
    """Non-empty clusters to draw: all when few, else evenly spaced over the size ranking."""
    ranked = np.argsort(-sizes, kind="stable")
    ranked = ranked[sizes[ranked] > 0]
    if len(ranked) <= max_curves:
        return ranked
    return ranked[np.linspace(0, len(ranked) - 1, max_curves).round().astype(int)]


def plot_clusters(means: np.ndarray, sizes: np.ndarray, steps: list[int]) -> bytes:
    """PNG bytes: cluster-mean trajectories (left) and a histogram of cluster sizes (right)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = np.asarray(sizes)
    shown = curves_to_draw(sizes)
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    cmap = colormaps["viridis"]
    for i, c in enumerate(shown):
        left.plot(steps, means[c], marker="o", ms=3, color=cmap(i / max(1, len(shown) - 1)),
                  label=f"cluster {c} ({sizes[c]:,})")
    left.set(xlabel="proxy training step", ylabel="mean loss",
             title=f"cluster-mean trajectories ({len(shown)} of {int((sizes > 0).sum())} clusters)")
    if len(shown) <= 10:
        left.legend(fontsize=7)
    right.hist(sizes[sizes > 0], bins=min(50, max(5, len(sizes) // 4)), color="tab:blue")
    right.set(xlabel="cluster size (examples)", ylabel="clusters",
              title=f"cluster sizes (K={len(sizes)}, N={int(sizes.sum()):,})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_report(run: RunDir, means: np.ndarray, sizes: np.ndarray, steps: list[int]) -> str:
    """Write ``report.png`` into the run directory; returns its path."""
    write_bytes_atomic(run.fs, run.report, plot_clusters(means, sizes, steps))
    return run.report


def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 1) -> str:
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def benchmark_markdown(results: dict) -> str:
    """The benchmark's tables: accuracy and loss per method and budget (mean ± std over seeds), per source, timings."""
    rows = sorted(results["summary"], key=lambda r: (r["budget"], -r["accuracy"]))
    sources = sorted(rows[0]["sources"]) if rows else []
    n = results["rows"]
    seeds = results["config"]["seeds"]
    lines = [f"Corpus of {n} examples; budgets {results['budgets']}; seeds {seeds}. Accuracy: exact match on "
             "the evaluation set, in %; loss: mean response loss; both mean ± std over seeds.", "",
             "| method | budget | examples | accuracy | loss |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {100 * r['budget'] / n:.0f}% | {r['examples']} | "
                     f"{_pm(r['accuracy'], r['accuracy_std'], 100)} | {_pm(r['loss'], r['loss_std'], digits=3)} |")
    for title, key, fmt in (("Accuracy per source (%, mean over seeds):", "sources", lambda v: f"{100 * v:.0f}"),
                            ("Response loss per source (mean over seeds):", "source_loss", lambda v: f"{v:.2f}")):
        lines += ["", title, "", "| method | budget | " + " | ".join(sources) + " |",
                  "|---|---:|" + "---:|" * len(sources)]
        lines += [f"| {r['method']} | {100 * r['budget'] / n:.0f}% | " + " | ".join(fmt(r[key][s]) for s in sources)
                  + " |" for r in rows]
    lines += _composition(results.get("composition") or [], n)
    lines += _comparisons(results.get("comparisons") or [], n)
    lines += _ledger(results.get("cost"), n)
    if results.get("global_clusters"):
        g = results["global_clusters"]
        lines += ["", f"S2L without source labels (`s2l-global`): one k-means of {g['k']} clusters over every example; "
                  f"the share of examples whose cluster's most common source is their own (source purity) is "
                  f"{g['source_purity']:.3f} (1: clusters are just sources)."]
    if results.get("bases"):
        b = results["bases"]
        sizes = ", ".join(f"{r} {b['parameters'][r]:,} parameters (final loss {b['final_loss'][r]:.3f})"
                          for r in b["parameters"])
        lines += ["", f"Pretrained bases: {sizes}" + (f", the target {b['target_to_proxy']:.1f}x the proxy"
                                                       if b.get("target_to_proxy") else "")
                  + f"; pretrained on {len(b['config']['sources'])} reasoning-gym generators x "
                  f"{b['config']['rows_per_source']} texts."]
    stages = results["selection_stages"]
    cells = results["cells"]
    mean = {k: sum(c["seconds"][k] for c in cells) / max(1, len(cells)) for k in ("select", "finetune", "evaluate")}
    lines += ["", "Wall time (s):", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| selection run: {k} | {v:.0f} |" for k, v in stages.items() if v is not None]
    lines += [f"| method subsets, per method and seed (mean) | {mean['select']:.1f} |",
              f"| fine-tune, per cell (mean of {len(cells)}) | {mean['finetune']:.0f} |",
              f"| evaluate, per cell (mean) | {mean['evaluate']:.0f} |",
              f"| whole benchmark (this run; reused work not counted) | {results['total_seconds']:.0f} |"]
    return "\n".join(lines) + "\n"


def _composition(rows: list[dict], n: int) -> list[str]:
    """Where each method's budget goes: examples per source in its subsets (mean over seeds)."""
    if not rows:
        return []
    sources = sorted(rows[0]["sources"])
    lines = ["", "Where the budget goes (examples per source in the subset, mean over seeds):", "",
             "| method | budget | " + " | ".join(sources) + " |", "|---|---:|" + "---:|" * len(sources)]
    for r in sorted(rows, key=lambda r: (r["budget"], r["method"])):
        lines.append(f"| {r['method']} | {100 * r['budget'] / n:.0f}% | "
                     + " | ".join(f"{r['sources'][s]:.0f}" for s in sources) + " |")
    return lines


def _comparisons(rows: list[dict], n: int) -> list[str]:
    """Paired differences against the baselines, with bootstrap intervals, as a markdown table."""
    if not rows:
        return []
    lines = ["", "Against the baselines (method minus baseline, paired by seed and evaluation item; 95% bootstrap "
             "interval over seeds and items; a win or a loss only where the interval excludes 0):", "",
             "| method | budget | baseline | exact match (points) | per seed | interval | loss | per seed | interval "
             "| verdict (exact match / loss) |", "|---|---:|---|---:|---|---|---:|---|---|---|"]
    pairs: dict[tuple, dict] = {}
    for r in rows:
        pairs.setdefault((r["method"], r["budget"], r["baseline"]), {})[r["metric"]] = r
    for (method, budget, base), m in sorted(pairs.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        a, lo = m["accuracy"], m["loss"]
        lines.append(f"| {method} | {100 * budget / n:.0f}% | {base} | {100 * a['mean']:+.1f} | "
                     + ", ".join(f"{100 * d:+.1f}" for d in a["per_seed"]) + f" | [{100 * a['low']:+.1f}, "
                     f"{100 * a['high']:+.1f}] | {lo['mean']:+.3f} | " + ", ".join(f"{d:+.3f}" for d in lo["per_seed"])
                     + f" | [{lo['low']:+.3f}, {lo['high']:+.3f}] | {a['verdict']} / {lo['verdict']} |")
    return lines


def _ledger(cost: dict | None, n: int) -> list[str]:
    """What the selection cost next to what fine-tuning cost, as a markdown table."""
    if not cost:
        return []
    unit = cost["unit"]
    lines = ["", f"Cost ({unit}: compute time times the threads or GPUs it held):", "",
             f"| what | {unit} |", "|---|---:|"]
    lines += [f"| selection: {k} | {v:.0f} |" for k, v in cost["selection"].items()]
    lines.append(f"| **selection, total** | **{cost['selection_total']:.0f}** |")
    lines += [f"| fine-tuning the target: {k.split()[0]} at {100 * int(k.split()[1]) / n:.0f}% (mean over seeds) "
              f"| {v:.0f} |" for k, v in sorted(cost["finetune_mean"].items())]
    if cost.get("selection_to_full_finetune"):
        lines.append(f"| selection / fine-tuning on the full set | {cost['selection_to_full_finetune']:.2f} |")
    return lines


def plot_benchmark(rows: list[dict], n: int) -> bytes:
    """PNG bytes: accuracy (left) and evaluation loss (right) against the budget, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in sorted(by_method.items()):
        rs = sorted(rs, key=lambda r: r["budget"])
        x = [100 * r["budget"] / n for r in rs]
        for ax, key, scale in ((axes[0], "accuracy", 100), (axes[1], "loss", 1)):
            y = [scale * r[key] for r in rs]
            err = [scale * r[f"{key}_std"] for r in rs]
            if method == "full":
                ax.axhline(y[0], color="black", ls="--", lw=1, label="full")
                ax.axhspan(y[0] - err[0], y[0] + err[0], color="black", alpha=0.08)
            else:
                ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1.5 if method == "s2l" else 1,
                            label=method)
    axes[0].set(xlabel="budget (% of the corpus)", ylabel="exact match (%)", title="accuracy (mean ± std over seeds)")
    axes[1].set(xlabel="budget (% of the corpus)", ylabel="mean response loss", title="evaluation loss (lower is better)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
