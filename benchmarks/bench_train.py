"""Padded against packed training batches, side by side in one run.

1. In this process, for each corpus (the demo mixture as ``text.encode`` stores it, and a
   MathInstruct-like length mix: lengths drawn long-tailed, log-normal, between 20 and 512 tokens,
   the second half of each row labelled) and each model shape (``tiny``, the demo proxy, and
   ``pythia-70m``): the same seeded batches of ``--batch-size`` rows train ``--steps`` AdamW steps
   padded (``text.collate``) and packed (``text.pack``), each from the same initial weights.
   Printed: the real-token share of each (real tokens / tokens computed), real tokens per second,
   the ratio packed / padded, and the largest per-step loss difference (they must agree); and the
   real-token share of scoring's length buckets (``scoring.max_tokens`` 8,192) on the same rows.
2. ``--finetune``: the demo corpus fine-tuned with ZeRO-2 on 2 Ray workers (real DeepSpeed), padded
   and packed: the training compute seconds that finetune.json records, and their ratio.
3. ``--select``: the demo selection (``configs/demo.yaml``, ``jobs/select.py``'s default, with
   ``--per-source`` rows per source) with ``proxy.packed`` false and true: the proxy's training
   compute (core-seconds, from the manifest) and the whole selection's seconds.

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --steps 4 --shapes tiny --no-finetune --no-select
"""
from __future__ import annotations

import _path  # noqa: F401,I001  (first: the repo root on sys.path)
import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from s2l_ray import demo
from s2l_ray.config import CorpusConfig, DemoConfig, TextConfig
from s2l_ray.corpus import normalise
from s2l_ray.models import load_tokenizer, preset_config
from s2l_ray.text import encode, training_batch

VOCAB = {"tiny": 0, "pythia-70m": 50304}
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def demo_rows(paths: dict, tok) -> tuple[list, list]:
    rows = [normalise(json.loads(line), CorpusConfig()) for line in open(paths["train"])]
    text = TextConfig()
    enc = encode(tok, [r["prompt"] for r in rows], [r["response"] for r in rows], [None] * len(rows),
                 template=text.template, chat=None, max_length=text.max_length)
    return enc["input_ids"], enc["spans"]


def long_tailed_rows(n: int, vocab: int, seed: int) -> tuple[list, list]:
    """Lengths log-normal (median 120), clipped to 20..512; random token ids; the second half labelled."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(120), 0.8, n).astype(int), 20, 512)
    ids = [rng.integers(1, vocab, n_).tolist() for n_ in lengths]
    return ids, [[len(x) // 2, len(x)] for x in ids]


def train(model_cfg, batches: list[tuple[list, list]], pad_id: int, packed: bool) -> tuple[float, list[float]]:
    """Seconds of the timed steps (after one warm-up step) and every step's loss."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses, start = [], 0.0
    for i, (ids, spans) in enumerate(batches):
        if i == 1:
            start = time.perf_counter()
        loss = model(**training_batch(ids, spans, pad_id, packed), use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return time.perf_counter() - start, losses


def scoring_share(ids: list, max_tokens: int = 8192) -> float:
    """Real tokens / tokens computed when scoring groups rows by length (``text.length_buckets``, as ``scoring``)."""
    from s2l_ray.text import length_buckets

    lengths = np.array([len(x) for x in ids])
    computed = sum(len(b) * lengths[b].max() for b in length_buckets(lengths, max_tokens))
    return lengths.sum() / computed


def in_process(corpora: dict, shapes: list[str], tok, a) -> None:
    rng = np.random.default_rng(a.seed)
    for name, (ids, spans) in corpora.items():
        print(f"{name:12s} scoring in length buckets of 8,192 tokens: real-token share "
              f"{100 * scoring_share(ids):.1f}%", flush=True)
        picks = [rng.choice(len(ids), a.batch_size, replace=False) for _ in range(a.steps + 1)]
        batches = [([ids[i] for i in p], [spans[i] for i in p]) for p in picks]
        real = sum(len(ids[i]) for p in picks[1:] for i in p)
        padded_tokens = sum(a.batch_size * max(len(ids[i]) for i in p) for p in picks[1:])
        for shape in shapes:
            cfg = preset_config(shape, tok, 512, vocab_size=VOCAB[shape])
            t_pad, l_pad = train(cfg, batches, tok.pad_token_id or 0, packed=False)
            t_pack, l_pack = train(cfg, batches, tok.pad_token_id or 0, packed=True)
            print(f"{name:12s} {shape:10s}: real-token share padded {100 * real / padded_tokens:5.1f}%, packed 100.0%; "
                  f"real tokens/s padded {real / t_pad:8.0f}, packed {real / t_pack:8.0f}, "
                  f"packed/padded {t_pad / t_pack:.2f}x; max |loss difference| "
                  f"{max(abs(x - y) for x, y in zip(l_pad, l_pack)):.1e}", flush=True)


def finetune_runs(paths: dict, work: str, a) -> None:
    from s2l_ray import finetune, pipeline
    from s2l_ray.config import FinetuneConfig, Placement

    pipeline.ensure_ray()
    seconds = {}
    for packed in (False, True):
        cfg = FinetuneConfig(output=os.path.join(work, f"finetune-{'packed' if packed else 'padded'}"),
                             corpus=CorpusConfig(path=paths["train"]),
                             text=TextConfig(tokenizer=paths["tokenizer"], max_length=512), preset=a.finetune_preset,
                             epochs=1, micro_batch_size=a.batch_size, checkpoint_every=0, zero_stage=2,
                             workers=Placement(count=2, cpus=max(1, (os.cpu_count() or 2) // 2)), packed=packed)
        seconds[packed] = finetune.run(cfg)["compute_seconds"]
    print(f"fine-tuning, ZeRO-2 on 2 workers ({a.finetune_preset}, demo corpus): compute {seconds[False]:.1f} s "
          f"padded, {seconds[True]:.1f} s packed: packed {seconds[False] / seconds[True]:.2f}x the padded rate",
          flush=True)


def selections(paths: dict, work: str, a) -> None:
    from s2l_ray import pipeline
    from s2l_ray.config import load_config

    cost = {}
    for packed in (False, True):  # on the demo corpus built above (the demo config's own default folder is cwd's)
        cfg = load_config(DEMO_CONFIG, {"output": os.path.join(work, f"select-{'packed' if packed else 'padded'}"),
                                        "corpus.path": paths["train"], "text.tokenizer": paths["tokenizer"],
                                        "proxy.packed": packed})
        m = pipeline.select(cfg)
        cost[packed] = (m["proxy"]["train_compute_seconds"], m["total_seconds"])
    print(f"demo selection: proxy training compute {cost[False][0]:.1f} core-s padded, {cost[True][0]:.1f} packed "
          f"({cost[False][0] / cost[True][0]:.2f}x); whole selection {cost[False][1]:.1f} s padded, "
          f"{cost[True][1]:.1f} s packed", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per mode (after one warm-up)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shapes", default="tiny,pythia-70m")
    p.add_argument("--long-rows", type=int, default=2000, help="rows of the long-tailed length mix")
    p.add_argument("--per-source", type=int, default=200, help="demo rows per source")
    p.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--finetune-preset", default="small")
    p.add_argument("--select", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="work directory (default: a temporary one)")
    a = p.parse_args()
    work = a.output or tempfile.mkdtemp(prefix="s2l-bench-train-")
    paths = demo.build(DemoConfig(train_per_source=a.per_source, eval_per_source=1), os.path.join(work, "data"))
    tok = load_tokenizer(paths["tokenizer"])
    print(f"torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs; {a.batch_size} rows a step", flush=True)
    corpora = {"demo": demo_rows(paths, tok), "long-tailed": long_tailed_rows(a.long_rows, len(tok), a.seed)}
    in_process(corpora, a.shapes.split(","), tok, a)
    if a.finetune:
        finetune_runs(paths, work, a)
    if a.select:
        selections(paths, work, a)


if __name__ == "__main__":
    main()
