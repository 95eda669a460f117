"""The benchmark's results as a person reads them: results.md (tables, comparisons, cost) and results.png."""
from __future__ import annotations

import io


def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 1) -> str:
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


EVAL_NAMES = {"eval": "the held-out set", "target": "the target task"}


def _budget(budget: int, n: int) -> str:
    return "-" if budget == 0 else f"{100 * budget / n:.0f}%"


def benchmark_markdown(results: dict) -> str:
    """The benchmark's tables: exact match and loss per method and budget (mean ± std over seeds) on each
    evaluation set, per source, where the budget goes, the comparisons, the cost ledger, timings."""
    names = list(results["summary"][0]["evals"]) if results["summary"] else ["eval"]
    rows = sorted(results["summary"], key=lambda r: (r["budget"] if r["method"] != "base" else -1,
                                                    -r["evals"][names[-1]]["accuracy"]))
    n = results["rows"]
    seeds = results["config"]["seeds"]
    head = " | ".join(f"exact match, {EVAL_NAMES[k]} | loss, {EVAL_NAMES[k]}" for k in names)
    lines = [f"Corpus of {n} examples; budgets {results['budgets']}; seeds {seeds}. Exact match in %; loss: mean "
             "response loss; both mean ± std over seeds (`base`: the target without fine-tuning).", "",
             f"| method | budget | examples | {head} |", "|---|---:|---:|" + "---:|---:|" * len(names)]
    for r in rows:
        lines.append(f"| {r['method']} | {_budget(r['budget'], n)} | {r['examples']} | " + " | ".join(
            f"{_pm(e['accuracy'], e['accuracy_std'], 100)} | {_pm(e['loss'], e['loss_std'], digits=3)}"
            for e in (r["evals"][k] for k in names)) + " |")
    for name in names:
        sources = sorted(rows[0]["evals"][name]["sources"]) if rows else []
        for title, key, fmt in (("Exact match per source (%, mean over seeds)", "sources", lambda v: f"{100 * v:.0f}"),
                                ("Response loss per source (mean over seeds)", "source_loss", lambda v: f"{v:.2f}")):
            lines += ["", f"{title}, {EVAL_NAMES[name]}:", "", "| method | budget | " + " | ".join(sources) + " |",
                      "|---|---:|" + "---:|" * len(sources)]
            lines += [f"| {r['method']} | {_budget(r['budget'], n)} | "
                      + " | ".join(fmt(r["evals"][name][key][s]) for s in sources) + " |" for r in rows]
    lines += _composition(results.get("composition") or [], n)
    for name in names:
        lines += _comparisons([c for c in results.get("comparisons") or [] if c["eval"] == name], n, EVAL_NAMES[name])
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
    cells = [c for c in results["cells"] if c["method"] != "base"]
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


def _comparisons(rows: list[dict], n: int, on: str) -> list[str]:
    """Paired differences against the baselines, with bootstrap intervals, as a markdown table."""
    if not rows:
        return []
    lines = ["", f"Against the baselines on {on} (method minus baseline, paired by seed and evaluation item; 95% "
             "bootstrap interval over seeds and items; a win or a loss only where the interval excludes 0):", "",
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
    """PNG bytes: exact match and loss of every method, one row of two panels per evaluation set. Several
    budgets: a line per method against the budget; one budget: a point per method (mean ± std over seeds).
    ``full`` and ``base`` are horizontal lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(rows[0]["evals"]) if rows else ["eval"]
    fig = Figure(figsize=(12, 4.5 * len(names)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), 2, squeeze=False)
    lines = [r for r in rows if r["method"] in ("full", "base")]
    methods = sorted({r["method"] for r in rows} - {"full", "base"})
    budgets = sorted({r["budget"] for r in rows if r["method"] not in ("full", "base")})
    for row, name in zip(axes, names):
        for ax, key, scale in ((row[0], "accuracy", 100), (row[1], "loss", 1)):
            for i, method in enumerate(methods):
                rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
                y = [scale * r["evals"][name][key] for r in rs]
                err = [scale * r["evals"][name][f"{key}_std"] for r in rs]
                x = [100 * r["budget"] / n for r in rs] if len(budgets) > 1 else [i]
                ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1.5 if method == "s2l" else 1,
                            label=method)
            for r, style in zip(lines, ("--", ":")):
                e = r["evals"][name]
                ax.axhline(scale * e[key], color="black", ls=style, lw=1, label=r["method"])
                ax.axhspan(scale * (e[key] - e[f"{key}_std"]), scale * (e[key] + e[f"{key}_std"]), color="black",
                           alpha=0.06)
            if len(budgets) > 1:
                ax.set_xlabel("budget (% of the corpus)")
            else:
                ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=7)
            ax.set(ylabel="exact match (%)" if key == "accuracy" else "mean response loss",
                   title=f"{'exact match' if key == 'accuracy' else 'response loss (lower is better)'}, "
                         f"{EVAL_NAMES[name]}")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def results_html(results: dict) -> str:
    """results.html: the same tables as results.md (means with intervals, per source, the budget's
    composition, the cost ledger) and the plot, as one self-contained page (Bokeh, sortable tables)."""
    import html

    from bokeh.models import ColumnDataSource, HoverTool, Whisker
    from bokeh.plotting import figure

    from ..report.html import WIDTH, heading, page, palette, table

    rows, n = results["summary"], results["rows"]
    names = list(rows[0]["evals"]) if rows else ["eval"]
    parts = [heading("S2L benchmark results", html.escape(
        f"Corpus of {n:,} examples; budgets {results['budgets']}; seeds {results['config']['seeds']}. Exact match "
        "and response loss, mean ± std over seeds (base: the target without fine-tuning)."))]
    summary = {"method": [r["method"] for r in rows], "budget": [_budget(r["budget"], n) for r in rows],
               "examples": [r["examples"] for r in rows]}
    cols = [("method", "method", "text"), ("budget", "budget", "text"), ("examples", "examples", "int")]
    for k in names:
        for metric, scale in (("accuracy", 100.0), ("loss", 1.0)):
            summary[f"{k}_{metric}"] = [scale * r["evals"][k][metric] for r in rows]
            summary[f"{k}_{metric}_std"] = [scale * r["evals"][k][f"{metric}_std"] for r in rows]
            label = "exact match (%)" if metric == "accuracy" else "loss"
            cols += [(f"{k}_{metric}", f"{label}, {EVAL_NAMES[k]}", "float"),
                     (f"{k}_{metric}_std", "± std", "float")]
    parts.append(table(summary, cols, height=min(500, 40 + 28 * len(rows))))
    methods = [r["method"] + ("" if r["method"] in ("full", "base") else f" {_budget(r['budget'], n)}")
               for r in rows]
    for k in names:
        for metric, scale in (("accuracy", 100.0), ("loss", 1.0)):
            y = [scale * r["evals"][k][metric] for r in rows]
            e = [scale * r["evals"][k][f"{metric}_std"] for r in rows]
            src = ColumnDataSource({"m": methods, "y": y, "lo": [a - b for a, b in zip(y, e)],
                                    "hi": [a + b for a, b in zip(y, e)], "color": palette(max(3, len(rows)))[:len(rows)]})
            fig = figure(x_range=methods, width=WIDTH, height=320, tools="save",
                         title=f"{'exact match (%)' if metric == 'accuracy' else 'response loss'}, {EVAL_NAMES[k]} "
                               "(mean ± std over seeds)")
            fig.scatter("m", "y", source=src, size=10, color="color")
            fig.add_layout(Whisker(source=src, base="m", upper="hi", lower="lo"))
            fig.add_tools(HoverTool(tooltips=[("", "@m"), ("mean", "@y{0.000}")]))
            fig.xaxis.major_label_orientation = 0.8
            parts.append(fig)
    comps = results.get("comparisons") or []
    if comps:
        parts.append(heading("Against the baselines", "Method minus baseline, paired by seed and evaluation item; "
                             "95% bootstrap interval over seeds and items; a win or a loss only where the interval "
                             "excludes 0."))
        scale = [100.0 if c["metric"] == "accuracy" else 1.0 for c in comps]
        parts.append(table({"method": [c["method"] for c in comps], "baseline": [c["baseline"] for c in comps],
                            "budget": [_budget(c["budget"], n) for c in comps],
                            "eval": [EVAL_NAMES[c["eval"]] for c in comps],
                            "metric": ["exact match (points)" if c["metric"] == "accuracy" else "loss" for c in comps],
                            "mean": [s * c["mean"] for s, c in zip(scale, comps)],
                            "low": [s * c["low"] for s, c in zip(scale, comps)],
                            "high": [s * c["high"] for s, c in zip(scale, comps)],
                            "verdict": [c["verdict"] for c in comps]},
                           [("method", "method", "text"), ("baseline", "baseline", "text"), ("budget", "budget", "text"),
                            ("eval", "evaluated on", "text"), ("metric", "metric", "text"), ("mean", "mean", "float"),
                            ("low", "interval low", "float"), ("high", "interval high", "float"),
                            ("verdict", "verdict", "text")], height=min(500, 40 + 28 * len(comps))))
    for k in names:
        sources = sorted(rows[0]["evals"][k]["sources"]) if rows else []
        data = {"method": summary["method"], "budget": summary["budget"]}
        for s in sources:
            data[s] = [100.0 * r["evals"][k]["sources"][s] for r in rows]
        parts += [heading(f"Exact match per source (%), {EVAL_NAMES[k]}"),
                  table(data, [("method", "method", "text"), ("budget", "budget", "text")]
                        + [(s, s, "float") for s in sources], height=min(500, 40 + 28 * len(rows)))]
    comp = results.get("composition") or []
    if comp:
        sources = sorted(comp[0]["sources"])
        data = {"method": [c["method"] for c in comp], "budget": [_budget(c["budget"], n) for c in comp],
                **{s: [c["sources"][s] for c in comp] for s in sources}}
        parts += [heading("Where the budget goes", "Examples per source in each method's subsets, mean over seeds."),
                  table(data, [("method", "method", "text"), ("budget", "budget", "text")]
                        + [(s, s, "float") for s in sources], height=min(500, 40 + 28 * len(comp)))]
    cost = results.get("cost")
    if cost:
        items = [(f"selection: {k}", v) for k, v in cost["selection"].items()] + [
            ("selection, total", cost["selection_total"])] + [
            (f"fine-tuning: {k}", v) for k, v in sorted(cost["finetune_mean"].items())]
        parts += [heading(f"Cost ({cost['unit']})"), table({"what": [i[0] for i in items], "value": [i[1] for i in items]},
                                                           [("what", "what", "text"), ("value", cost["unit"], "float")],
                                                           height=min(400, 40 + 28 * len(items)))]
    return page(parts, "S2L benchmark results")
