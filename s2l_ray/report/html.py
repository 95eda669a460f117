"""``report.html``: the report's content (``data.collect``) drawn with Bokeh into one self-contained page.

The page is a standalone Bokeh document with its JavaScript inline (no server, no network), so it
opens from disk or from an object store alike. Tables are Bokeh's sortable DataTables; selecting
clusters in the cluster table highlights their trajectories and bands, since both draw from one
ColumnDataSource (no JavaScript of the project's own).
"""
from __future__ import annotations

import html
import json

from bokeh.embed import file_html
from bokeh.layouts import column, row
from bokeh.models import (
    ColumnDataSource,
    DataTable,
    Div,
    FactorRange,
    HoverTool,
    NumberFormatter,
    Span,
    TableColumn,
)
from bokeh.palettes import Category20, Turbo256
from bokeh.plotting import figure
from bokeh.resources import INLINE

WIDTH = 1100


def palette(k: int) -> list[str]:
    if k <= 20:
        return list(Category20[20][:max(k, 3)])[:k]
    return [Turbo256[int(i * 255 / max(1, k - 1))] for i in range(k)]


def heading(text: str, note: str = "") -> Div:
    return Div(text=f"<h2>{html.escape(text)}</h2>" + (f"<p>{note}</p>" if note else ""), width=WIDTH)


def table(data: dict | ColumnDataSource, columns: list[tuple[str, str, str]], height: int = 280) -> DataTable:
    """A sortable table over ``data``; columns (field, title, kind: text | int | float | pct)."""
    fmt = {"int": NumberFormatter(format="0,0"), "float": NumberFormatter(format="0.000"),
           "pct": NumberFormatter(format="0.0%")}
    cols = [TableColumn(field=f, title=t, formatter=fmt[k]) if k in fmt else TableColumn(field=f, title=t)
            for f, t, k in columns]
    source = data if isinstance(data, ColumnDataSource) else ColumnDataSource(data)
    return DataTable(source=source, columns=cols, width=WIDTH, height=height, sortable=True, index_position=None)


def _clusters(report: dict) -> list:
    clusters = [c for c in report["clusters"] if c["mean"]]
    budgets = report["budgets"]
    first = budgets[0] if budgets else None
    steps = [p["step"] for p in report["points"]]
    colors = palette(len(clusters))
    top = [max(c["mix"], key=c["mix"].get) if c["mix"] else "" for c in clusters]
    data = {
        "cluster": [c["cluster"] for c in clusters], "size": [c["size"] for c in clusters],
        "selected": [c["selected"].get(first, 0) if first else 0 for c in clusters],
        "taken": [(c["selected"].get(first, 0) / c["size"]) if first and c["size"] else 0.0 for c in clusters],
        "top_source": top,
        "top_share": [c["mix"][s] / c["size"] if s else 0.0 for c, s in zip(clusters, top)],
        "mix": [", ".join(f"{k} {v / c['size']:.0%}" for k, v in sorted(c["mix"].items(), key=lambda kv: -kv[1]))
                for c in clusters],
        "first_loss": [c["mean"][0] for c in clusters], "last_loss": [c["mean"][-1] for c in clusters],
        "example": [c["examples"][0]["prompt"] if c["examples"] else "" for c in clusters],
        "xs": [steps for _ in clusters], "ys": [c["mean"] for c in clusters],
        "band_x": [steps + steps[::-1] for _ in clusters],
        "band_y": [[m + s for m, s in zip(c["mean"], c["std"])] + [m - s for m, s in zip(c["mean"], c["std"])][::-1]
                   for c in clusters],
        "color": colors,
    }
    source = ColumnDataSource(data)
    fig = figure(width=WIDTH, height=380, title="Loss trajectory of each cluster (mean, and ± one standard deviation "
                 "over a sample of its rows); select rows of the table below to pick clusters out",
                 x_axis_label="proxy training step", y_axis_label="loss (mean over response tokens)",
                 tools="pan,wheel_zoom,box_zoom,reset,save,tap")
    bands = fig.patches("band_x", "band_y", source=source, fill_color="color", fill_alpha=0.08, line_alpha=0)
    bands.selection_glyph = bands.glyph.clone(fill_alpha=0.3)
    bands.nonselection_glyph = bands.glyph.clone(fill_alpha=0.02)
    lines = fig.multi_line("xs", "ys", source=source, line_color="color", line_width=1.5, line_alpha=0.8)
    lines.selection_glyph = lines.glyph.clone(line_width=3, line_alpha=1.0)
    lines.nonselection_glyph = lines.glyph.clone(line_alpha=0.15)
    fig.add_tools(HoverTool(renderers=[lines], tooltips=[("cluster", "@cluster"), ("rows", "@size"),
                                                          ("selected", "@selected"), ("top source", "@top_source")]))
    cols = [("cluster", "cluster", "int"), ("size", "rows", "int"),
            ("selected", f"selected ({first})" if first else "selected", "int"), ("taken", "share taken", "pct"),
            ("top_source", "top source", "text"), ("top_share", "its share", "pct"),
            ("first_loss", "loss, first point", "float"), ("last_loss", "loss, last point", "float"),
            ("mix", "source mix", "text"), ("example", "example (nearest the centroid)", "text")]
    clusters_table = table(source, cols, height=min(300, 40 + 28 * len(clusters)))
    sizes = figure(width=WIDTH // 2, height=300, title=f"Rows per cluster and rows selected ({first or '-'})",
                   x_axis_label="cluster (by size)", y_axis_label="rows", tools="save")
    order = sorted(range(len(clusters)), key=lambda i: -data["size"][i])
    x = list(range(len(order)))
    sizes.vbar(x=x, top=[data["size"][i] for i in order], width=0.9, color="lightgray", legend_label="rows")
    sizes.vbar(x=x, top=[data["selected"][i] for i in order], width=0.9, color="#1f77b4", legend_label="selected")
    examples = {"cluster": [], "id": [], "source": [], "prompt": [], "response": []}
    for c in clusters:
        for e in c["examples"]:
            examples["cluster"].append(c["cluster"])
            for k in ("id", "source", "prompt", "response"):
                examples[k].append(e[k])
    ex = table(examples, [("cluster", "cluster", "int"), ("id", "id", "text"), ("source", "source", "text"),
                           ("prompt", "prompt", "text"), ("response", "response", "text")],
               height=min(260, 40 + 28 * len(examples["id"])))
    stats = report.get("cluster_stats") or {}
    note = (f"{len(report['clusters'])} clusters ({stats.get('backend')}"
            + (", one k-means per source" if stats.get("per_source") else "")
            + f"); source purity {stats['source_purity']:.3f} (1: each cluster is one source)"
            if stats.get("source_purity") is not None else "")
    return [heading("Clusters", html.escape(note)), fig, clusters_table, row(sizes), heading("Example rows",
            "The rows nearest each cluster's centroid, chosen the same way every time."), ex]


def _sources(report: dict) -> list:
    budgets = report["budgets"]
    names = [s["source"] for s in report["sources"]]
    n = max(1, report["rows"])
    data = {"source": names, "corpus": [s["corpus"] for s in report["sources"]],
            "corpus_share": [s["corpus"] / n for s in report["sources"]]}
    cols = [("source", "source", "text"), ("corpus", "rows", "int"), ("corpus_share", "corpus share", "pct")]
    series = ["corpus"] + [f"selected ({b})" for b in budgets]
    bars = {"x": [(name, "corpus") for name in names], "share": list(data["corpus_share"]),
            "color": ["lightgray"] * len(names)}
    for j, b in enumerate(budgets):
        picked = [s["selected"].get(b, 0) for s in report["sources"]]
        total = max(1, sum(picked))
        data[f"selected_{b}"] = picked
        data[f"share_{b}"] = [p / total for p in picked]
        cols += [(f"selected_{b}", f"selected ({b})", "int"), (f"share_{b}", f"selected share ({b})", "pct")]
        bars["x"] += [(name, series[j + 1]) for name in names]
        bars["share"] += data[f"share_{b}"]
        bars["color"] += [palette(max(3, len(budgets)))[j]] * len(names)
    fig = figure(x_range=FactorRange(*[(name, s) for name in names for s in series]), width=WIDTH, height=340,
                 title="Share of each source in the corpus (gray) and in each selection", y_axis_label="share",
                 tools="save")
    fig.vbar(x="x", top="share", color="color", width=0.9, source=ColumnDataSource(bars))
    fig.xaxis.major_label_orientation = 1.0
    fig.add_tools(HoverTool(tooltips=[("", "@x"), ("share", "@share{0.0%}")]))
    return [heading("Sources"), fig, table(data, cols, height=min(300, 40 + 28 * len(names)))]


def _data_map(report: dict) -> list:
    d = report["data_map"]
    budgets = report["budgets"]
    first = budgets[0] if budgets else None
    clusters = d["cluster"]
    k = (max(clusters) + 1) if clusters else 1
    colors = palette(k)
    data = {"variability": d["variability"], "confidence": d["confidence"], "id": d["id"], "source": d["source"],
            "cluster": clusters if clusters else [""] * len(d["id"]),
            "color": [colors[c] for c in clusters] if clusters else ["#1f77b4"] * len(d["id"]),
            "selected": d["selected"].get(first, [False] * len(d["id"])) if first else [False] * len(d["id"])}
    fig = figure(width=WIDTH, height=420, title=f"Data map: {len(d['id'])} sampled rows (mean and standard deviation "
                 "over the trajectory points of the gold response's token probability); ringed: selected"
                 + (f" ({first})" if first else ""), x_axis_label="variability", y_axis_label="confidence",
                 tools="pan,wheel_zoom,box_zoom,reset,save")
    rest = ColumnDataSource({k: [v for v, s in zip(vals, data["selected"]) if not s] for k, vals in data.items()})
    taken = ColumnDataSource({k: [v for v, s in zip(vals, data["selected"]) if s] for k, vals in data.items()})
    r1 = fig.scatter("variability", "confidence", source=rest, color="color", size=5, alpha=0.5)
    r2 = fig.scatter("variability", "confidence", source=taken, fill_color="color", line_color="black", size=8,
                     line_width=1.2)
    fig.add_tools(HoverTool(renderers=[r1, r2], tooltips=[("id", "@id"), ("source", "@source"),
                                                          ("cluster", "@cluster")]))
    return [heading("Data map", "Easy rows sit high (confident), hard ones low, ambiguous ones to the right "
                     "(their confidence moved during training)."), fig]


def _proxy(report: dict) -> list:
    fig = figure(width=WIDTH, height=320, title="The proxy's training loss per step, and each trajectory point's "
                 "mean loss over the corpus", x_axis_label="proxy training step", y_axis_label="loss",
                 tools="pan,wheel_zoom,box_zoom,reset,save")
    if report["proxy_loss"]:
        steps, loss = zip(*report["proxy_loss"])
        fig.line(list(steps), list(loss), color="gray", legend_label="training loss (batch)")
    points = [p for p in report["points"] if p["mean_loss"] is not None]
    if points:
        fig.scatter([p["step"] for p in points], [p["mean_loss"] for p in points], size=9, color="#d62728",
                    legend_label="trajectory point: mean loss over the corpus")
    for p in report["points"]:
        fig.add_layout(Span(location=p["step"], dimension="height", line_color="#d62728", line_alpha=0.2))
    return [heading("Proxy training"), fig]


def _facts(report: dict) -> list:
    f = report["facts"]
    corpus = f["corpus"]
    dropped = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in (corpus.get("dropped") or {}).items() if v) or "none"
    lines = [("run", report["run"]), ("method", report["method"]), ("budgets", ", ".join(report["budgets"])),
             ("corpus rows", f"{corpus.get('rows'):,}"), ("corpus fingerprint", corpus.get("fingerprint")),
             ("tokens", f"{corpus.get('tokens') or 0:,}"), ("truncated", corpus.get("truncated")),
             ("rows dropped", dropped)]
    if f["target"]:
        lines.append(("target examples", f"{f['target']['rows']} ({', '.join(f['target']['sources'])})"))
    lines += [(f"stage: {k}", f"{v:.1f} s") for k, v in f["seconds"].items() if v is not None]
    if f.get("total_seconds") is not None:
        lines.append(("whole run", f"{f['total_seconds']:.1f} s"))
    if f.get("cost"):
        c = f["cost"]
        lines += [(f"cost: {k}", f"{v:.0f} {c['unit']}") for k, v in c["selection"].items()]
    body = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(str(k))}</th>"
                   f"<td>{html.escape(str(v))}</td></tr>" for k, v in lines)
    config = html.escape(json.dumps(f["config"], indent=1))
    return [heading("The run"), Div(text=f"<table>{body}</table><details><summary>config</summary>"
                                          f"<pre>{config}</pre></details>", width=WIDTH)]


def render(report: dict) -> str:
    """The page as one HTML string (Bokeh's JavaScript inline)."""
    title = Div(text=f"<h1>S2L selection report</h1><p>{html.escape(report['run'])}: {report['rows']:,} rows, "
                     f"method <b>{html.escape(str(report['method']))}</b>, budgets "
                     f"{html.escape(', '.join(report['budgets']))}</p>", width=WIDTH)
    parts = [title]
    if report.get("clusters"):
        parts += _clusters(report)
    parts += _sources(report) + _data_map(report) + _proxy(report) + _facts(report)
    return page(parts, "S2L selection report")


def page(parts: list, title: str) -> str:
    """One self-contained HTML page of Bokeh models, one below the other (BokehJS inline)."""
    return file_html(column(*parts), resources=INLINE, title=title)
