"""The quality benchmark: selection methods side by side on one corpus and one or two evaluation sets.

One selection run trains the proxy and records the trajectories once (of the corpus, and of the
target examples when given), clusters them, and embeds the rows when a method needs it; every
method then picks its subsets from that run, for every seed. A target is fine-tuned on each
(method, budget, seed) subset and evaluated on the held-out set (and on the one-task target
evaluation set when given); ``full`` trains on everything and ``base`` evaluates the target
without fine-tuning. Everything lands under ``<output>/``::

    data/                          the demo mixture (when no corpus is given)
    bases/                         the pretrained bases (bases.enabled; bases.output shares another folder's)
    selection/                     the selection run (pipeline.select)
    clusters-global/               one global k-means over the same trajectories (method "s2l-global")
    selections/<method>/seed<s>/   selection[-<B>].parquet, selected[-<B>].jsonl
    targets/<method>-<B>/seed<s>/  fine-tuning output, eval/ (and eval-target/), cell.json
    sweeps/targets/                Ray Train's record of the targets' sweep
    results.json, results.md, results.png, results.html

A method is a selection method's name, ``s2l-global``, or either with a source split
(``s2l@proportional``, ``random-per-source@target``). Finished cells, subsets, bases and stages
are reused on rerun. ``grid`` runs the cells, ``bases`` pretrains the bases, ``analysis``
aggregates and compares, ``tables`` writes results.md and the plot.
"""
from .bases import build_bases
from .grid import dry_run, prepare, run

__all__ = ["build_bases", "dry_run", "prepare", "run"]
