"""Evaluation: greedy generation with a Ray Data actor pool, exact match of the final answer, response loss.

Rows are read like a training corpus (``corpus.normalise``: prompt/response, GSM8K's
``question``/``answer``, MATH's ``problem``/``solution``, or chat ``messages``) and tokenised by
the same ``text.encode`` as in training: the model is given the ids before the last response,
so a chat-formatted set prompts an instruct model through its chat template. Generation stops
at every EOS id of the model's generation config and at ``stop`` strings (default: the plain
template's question prefix, ``Question:``). The gold answer is the ``answer`` column or else
the response, read by ``answers.extract_gold`` (after ``####``, in ``\\boxed{}``, or a short
response as it is); the prediction by ``answers.extract_prediction``; they are compared by
``answers.answers_match``. The loss is the teacher-forced mean cross-entropy over each row's
response tokens (as in the selection stage), averaged over rows. Outputs, in ``<output>/``:
``metrics.json``, ``metrics.md`` (one table, per source and overall) and ``predictions.jsonl``.
"""
from __future__ import annotations

import itertools
import json
import math
import posixpath
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from . import tracking
from .answers import answers_match, extract_gold, extract_prediction
from .config import EvaluateConfig, TextConfig, parse_resources, to_dict
from .layout import absolute
from .progress import Progress
from .progress import log as _log

LONG = 1 << 30  # a max_length that cuts nothing: prompts are cut from the left instead


class EvaluateError(ValueError):
    """The evaluation set or model is missing or malformed; the message names the file and row."""


def log(msg: str) -> None:
    _log(msg, "evaluate")


def end_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends generation: the model's generation config's EOS ids and the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id not in ids else ids


def stop_strings(cfg: EvaluateConfig) -> list[str]:
    """``cfg.stop``, or the plain template's text before ``{prompt}`` when none is given."""
    from .text import stop_prefix

    return list(cfg.stop) if cfg.stop else [s for s in [stop_prefix(cfg.text.template)] if s]


class Evaluator:
    """Ray Data actor: per batch, greedy completions, exact match and response losses of each row's model.

    Rows name their model (``model`` column); the actor keeps the last model it loaded, so rows
    ordered by model load each one once per actor.
    """

    def __init__(self, tokenizer_dir: str, text: TextConfig, max_new_tokens: int, stop: list[str], use_gpu: bool,
                 bf16: bool, ordered_lists: bool = False):
        from .models import load_tokenizer
        from .text import chat_template

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.chat = chat_template(self.tokenizer, text.chat_template)
        self.text, self.max_new_tokens, self.stop, self.ordered = text, max_new_tokens, stop, ordered_lists
        self.model_dir, self.model = "", None

    def _use(self, model_dir: str) -> None:
        from .models import load_model

        if model_dir != self.model_dir:
            self.model = load_model(model_dir, dtype=self.dtype).to(self.device).eval()
            self.model_dir = model_dir

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]]) -> list[str]:
        """Greedy completions of left-padded prompt ids (each keeps its last max_length - max_new_tokens)."""
        tok = self.tokenizer
        keep = max(1, self.text.max_length - self.max_new_tokens)
        ids = [x[-keep:] for x in prompts]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                  do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id,
                                  eos_token_id=end_ids(self.model, tok), stop_strings=self.stop or None,
                                  tokenizer=tok)
        return tok.batch_decode(out[:, width:], skip_special_tokens=True)

    def _score(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from .corpus import tokenize
        from .scoring import example_losses
        from .text import collate, labels_from, prompt_ids

        rows = [{"prompt": str(p), "response": str(r), "messages": m if isinstance(m, str) and m else None}
                for p, r, m in zip(batch["prompt"], batch["response"], batch["messages"])]
        where = [str(w) for w in batch["where"]]
        full = tokenize(self.tokenizer, self.chat, rows, replace(self.text, max_length=LONG), where)
        generations = self.generate([prompt_ids(ids, sp) for ids, sp in zip(full["input_ids"], full["spans"])])
        enc = tokenize(self.tokenizer, self.chat, rows, self.text, where)
        b = collate(enc["input_ids"], [labels_from(x, sp) for x, sp in zip(enc["input_ids"], enc["spans"])],
                    self.tokenizer.pad_token_id)
        loss, _, n = example_losses(self.model, b["input_ids"].to(self.device), b["labels"].to(self.device))
        predictions = [extract_prediction(g, self.stop) for g in generations]
        return {"model": [str(x) for x in batch["model"]], "index": batch["index"].tolist(),
                "id": [str(x) for x in batch["id"]], "source": [str(x) for x in batch["source"]],
                "gold": [str(x) for x in batch["gold"]], "prediction": predictions, "generation": generations,
                "correct": [answers_match(p, str(g), self.ordered) for p, g in zip(predictions, batch["gold"])],
                "loss": loss.float().cpu().tolist(), "n_response": n.cpu().tolist()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        models = batch["model"]
        cuts = [0] + [i for i in range(1, len(models)) if models[i] != models[i - 1]] + [len(models)]
        out: dict[str, list] = {}
        for a, b in itertools.pairwise(cuts):  # each run of rows of one model
            self._use(str(models[a]))
            for k, v in self._score({k: v[a:b] for k, v in batch.items()}).items():
                out.setdefault(k, []).extend(v)
        return out


def load_rows(path: str, cfg: EvaluateConfig) -> list[dict]:
    """Evaluation rows (index, id, source, prompt, response, messages, gold, where), the first ``cfg.limit``."""
    from .corpus import CorpusError, RowError, normalise, records

    rows = []
    try:
        for where, rec in records(replace(cfg.corpus, path=path)):
            try:
                r = normalise(rec, cfg.corpus)
            except RowError as e:
                raise EvaluateError(f"{where}: {e}") from None
            if r["drop"]:
                raise EvaluateError(f"{where}: {r['drop'].replace('_', ' ')}: an evaluation row needs a prompt and "
                                    "a reference response")
            given = rec.get(cfg.answer)
            gold = extract_gold(str(given)) if given is not None and str(given).strip() else extract_gold(r["response"])
            if not gold:
                raise EvaluateError(f"{where}: no gold answer: add an {cfg.answer!r} field, or end the response "
                                    "with '#### <answer>' or a \\boxed{} answer")
            messages = r["messages"] or (json.dumps([{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["response"]}])
                                         if cfg.chat else None)
            rows.append({"index": len(rows), "id": r["id"], "source": r["source"], "prompt": r["prompt"],
                         "response": r["response"], "messages": messages, "gold": gold, "where": where})
            if cfg.limit and len(rows) == cfg.limit:
                break
    except CorpusError as e:
        raise EvaluateError(f"evaluation data: {e}") from None
    if not rows:
        raise EvaluateError(f"{path}: no evaluation rows")
    return rows


def summarize(results: list[dict]) -> dict:
    """Exact match and mean response loss per source and overall (plus the unweighted mean over sources)."""
    def stats(rs: list[dict]) -> dict:
        losses = [r["loss"] for r in rs if r["loss"] is not None and math.isfinite(r["loss"])]
        correct = sum(bool(r["correct"]) for r in rs)
        return {"n": len(rs), "correct": correct, "accuracy": correct / len(rs),
                "loss": float(np.mean(losses)) if losses else None}

    sources = sorted({r["source"] for r in results})
    by_source = {s: stats([r for r in results if r["source"] == s]) for s in sources}
    overall = stats(results)
    overall["macro_accuracy"] = float(np.mean([v["accuracy"] for v in by_source.values()]))
    return {"overall": overall, "sources": by_source}


def markdown(metrics: dict) -> str:
    """The metrics as one markdown table."""
    def row(name: str, s: dict) -> str:
        loss = "n/a" if s["loss"] is None else f"{s['loss']:.4f}"
        return f"| {name} | {s['n']} | {s['correct']} | {100 * s['accuracy']:.1f}% | {loss} |"

    lines = [f"Model `{metrics['model']}` on `{metrics['data']}` (greedy, max {metrics['max_new_tokens']} new tokens)",
             "", "| source | n | correct | exact match | mean response loss |", "|---|---:|---:|---:|---:|"]
    lines += [row(s, v) for s, v in metrics["sources"].items()]
    lines.append(row("**overall**", metrics["overall"]))
    lines.append(f"\nMean exact match over sources: {100 * metrics['overall']['macro_accuracy']:.1f}%")
    return "\n".join(lines) + "\n"



def resolve_paths(cfg: EvaluateConfig) -> tuple[str, str]:
    """The HF model dir (a fine-tuning output's model/ when given that) and the output dir; paths or URIs."""
    from .hub import from_hub, hub_id
    from .layout import exists, resolve

    parsed = hub_id(cfg.model)
    default_output = f"runs/eval-{parsed[0].replace('/', '--')}" if parsed else None  # not inside the Hub cache
    model = absolute(from_hub(cfg.model, "model", {}, cfg.output or ""))
    fs, root = resolve(model)
    run_dir = model
    if exists(fs, posixpath.join(root, "model", "config.json")):
        model = posixpath.join(model, "model")
    elif not exists(fs, posixpath.join(root, "config.json")):
        raise EvaluateError(f"{cfg.model}: not a model directory (no config.json) nor a fine-tuning output "
                            "(no model/config.json); run jobs/finetune.py first or pass --model")
    return model, cfg.output or default_output or posixpath.join(run_dir, "eval")


PROMPT_FORMAT = ("template", "chat_template")


def trained_format(cfg: EvaluateConfig) -> EvaluateConfig:
    """``cfg`` prompting as the fine-tuning output ``cfg.model`` was trained: its recorded ``text.template`` and
    ``text.chat_template`` (finetune.json) where ``cfg`` leaves them at their defaults; a setting given
    explicitly wins."""
    from .finetune.record import read_summary
    from .layout import RunDir

    run = RunDir(absolute(cfg.model))
    recorded = ((read_summary(run) or {}).get("config") or {}).get("text") or {}
    default = TextConfig()
    take = {k: recorded[k] for k in PROMPT_FORMAT
            if k in recorded and getattr(cfg.text, k) == getattr(default, k) and recorded[k] != getattr(default, k)}
    if not take:
        return cfg
    log(f"{cfg.model}: prompting as it was fine-tuned (finetune.json): " + ", ".join(f"text.{k}={v!r}"
                                                                                    for k, v in take.items()))
    return replace(cfg, text=replace(cfg.text, **take))


def check(cfg: EvaluateConfig) -> None:
    """What is checked before Ray starts: the settings that need no data or model."""
    tracking.check(cfg.tracking)


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.corpus.path`` (default: the demo eval set); returns the metrics."""
    return run_many([cfg])[0]


def run_many(cfgs: list[EvaluateConfig]) -> list[dict]:
    """Evaluate several models on one evaluation set in one pass of one actor pool; their metrics.

    The configs may differ only in ``model`` and ``output``.
    """
    import ray.data

    from .finetune import demo_paths
    from .models import resolve_bf16, resolve_gpu
    from .nodes import autoscaling, check_visible

    for c in cfgs:
        check(c)
    paths = [resolve_paths(c) for c in cfgs]
    cfgs = [c if model == absolute(c.model) else trained_format(c) for c, (model, _) in zip(cfgs, paths)]
    cfg = cfgs[0]
    for c in cfgs[1:]:
        if replace(c, model=cfg.model, output=cfg.output) != cfg:
            raise EvaluateError(f"{c.model}: evaluating several models at once needs configs that differ only in "
                                "model and output")
    data = cfg.corpus.path or demo_paths()["eval"]
    check_visible({"data": data, "text.tokenizer": cfg.text.tokenizer} | {f"model {m}": m for m, _ in paths},
                  {f"output {o}": o for _, o in paths})
    rows = load_rows(data, cfg)
    use_gpu = resolve_gpu(cfg.use_gpu)
    actors = cfg.actors.count
    growing = autoscaling()
    if use_gpu and not growing:  # no more actors than the cluster's GPUs can hold
        actors = min(actors, max(1, int(ray.cluster_resources().get("GPU", 0) // cfg.actors.gpus)))
    # on a cluster that may grow, the pool starts with one actor and grows as nodes join
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=actors) if growing else ray.data.ActorPoolStrategy(size=actors)
    log(f"{len(rows)} rows of {data}; {len(cfgs)} model(s) ({paths[0][0]}{', ...' if len(cfgs) > 1 else ''}); "
        f"{actors} actors on {'GPU' if use_gpu else 'CPU'}")
    started = time.time()
    items = [{**r, "model": model} for model, _ in paths for r in rows]
    batch = max(1, min(cfg.batch_size, math.ceil(len(items) / actors)))  # every actor gets work
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch))
    ds = ds.map_batches(
        Evaluator, batch_size=batch, batch_format="numpy",
        fn_constructor_kwargs=dict(tokenizer_dir=absolute(cfg.text.tokenizer or paths[0][0]),
                                   text=cfg.text, max_new_tokens=cfg.max_new_tokens, stop=stop_strings(cfg),
                                   use_gpu=use_gpu, bf16=resolve_bf16(cfg.precision, use_gpu),
                                   ordered_lists=cfg.ordered_lists),
        compute=pool, num_cpus=cfg.actors.cpus, num_gpus=cfg.actors.gpus if use_gpu else 0,
        resources=parse_resources(cfg.actors.resources, "actors.resources") or None)
    by_model: dict[str, list[dict]] = {}
    done: list[dict] = []
    progress = Progress(len(items), "rows", "evaluate")
    for r in ds.iter_rows():
        by_model.setdefault(r["model"], []).append(r)
        done.append(r)
        progress(done)
    seconds = round(time.time() - started, 2)
    return [_write(c, model_dir, out, data, sorted(by_model[model_dir], key=lambda r: r["index"]),
                   seconds / len(cfgs))
            for c, (model_dir, out) in zip(cfgs, paths)]


def _write(cfg: EvaluateConfig, model_dir: str, out: str, data: str, results: list[dict], seconds: float) -> dict:
    """One model's metrics.json, metrics.md and predictions.jsonl; returns the metrics."""
    for r in results:
        r["loss"] = None if not math.isfinite(r["loss"]) else float(r["loss"])
        r["correct"] = bool(r["correct"])
    metrics = {"model": model_dir, "data": data, "rows": len(results), "max_new_tokens": cfg.max_new_tokens,
               **summarize(results), "seconds": round(seconds, 2), "config": to_dict(cfg)}
    from .layout import resolve, write_bytes_atomic, write_json_atomic

    fs, root = resolve(out)
    write_json_atomic(fs, posixpath.join(root, "metrics.json"), metrics)
    write_bytes_atomic(fs, posixpath.join(root, "metrics.md"), markdown(metrics).encode())
    write_bytes_atomic(fs, posixpath.join(root, "predictions.jsonl"), "".join(
        json.dumps({k: r[k] for k in ("id", "source", "gold", "prediction", "correct", "loss", "generation")}) + "\n"
        for r in results).encode())
    with tracking.tracked(cfg.tracking, tracking.run_name(cfg.tracking, out), to_dict(cfg)) as tracker:
        tracker.metrics({f"eval/{k}": v for k, v in metrics["overall"].items()}
                        | {f"eval/source/{s}/{k}": v for s, rec in metrics["sources"].items() for k, v in rec.items()})
        tracker.files("evaluation", fs, [posixpath.join(root, f) for f in ("metrics.json", "metrics.md")])
    o = metrics["overall"]
    log(f"{model_dir}: exact match {100 * o['accuracy']:.1f}% ({o['correct']}/{o['n']}), mean response loss "
        f"{o['loss']}; wrote {out}/metrics.json, metrics.md")
    return metrics
