"""Evaluation: greedy generation with a Ray Data actor pool, exact match of the final answer, response loss.

The final answer of a text is what follows its last ``####`` (first line only), else its last
number. Two answers match when both parse as numbers and are equal (``12.50`` = ``12.5``,
``1,000`` = ``1000``, ``3/4`` = ``0.75`` = ``\\frac{3}{4}``; ``$``, ``%`` and a trailing period
ignored), or else when their normalised strings are equal (case, spaces and the spelling of
multiplication, ``×`` ``\\times`` ``*`` or ``x`` between digits, ignored). The loss is the
teacher-forced mean cross-entropy over each row's response tokens (as in the selection stage),
averaged over rows. Outputs, in ``<output>/``: ``metrics.json``, ``metrics.md`` (one table, per
source and overall) and ``predictions.jsonl``.
"""
from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import re
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import EvaluateConfig, to_dict

_NUMBER = re.compile(r"-?\$?(?:\d(?:[\d,]*\d)?(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?%?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


class EvaluateError(ValueError):
    """The evaluation set or model is missing or malformed; the message names the file and row."""


def log(msg: str) -> None:
    print(f"[evaluate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def extract_answer(text: str) -> str:
    """The text after the last ``####`` (its first line), else the last number in ``text``, else ``""``."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    numbers = _NUMBER.findall(text.replace("−", "-"))
    return numbers[-1].strip().rstrip(".") if numbers else ""


def _clean(text: str) -> str:
    s = _LATEX_FRAC.sub(r"\1/\2", text.strip())
    s = s.replace("−", "-").replace("\\!", "").replace("\\,", "")
    s = s.strip("$ ").rstrip(".").strip()
    return s


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number (integer, decimal, fraction, thousands commas, ``$``, ``%``), else None."""
    s = _clean(text).replace("$", "").replace(" ", "")
    if s.endswith("%"):
        s = s[:-1]
    if "," in s:
        if not _THOUSANDS.fullmatch(s):
            return None
        s = s.replace(",", "")
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(/[-+]?\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def normalize_text(text: str) -> str:
    """A non-numeric answer for comparison: lower case, no spaces, one spelling of multiplication."""
    s = _clean(text).lower().replace("\\times", "*").replace("×", "*").replace("·", "*")
    s = re.sub(r"(?<=\d)\s*x\s*(?=\d)", "*", s)
    return re.sub(r"\s+", "", s)


def answers_match(prediction: str, gold: str) -> bool:
    """Exact match of two final answers: numerically when both are numbers, else as normalised strings."""
    p, g = parse_number(prediction), parse_number(gold)
    if p is not None and g is not None:
        return p == g
    return bool(normalize_text(gold)) and normalize_text(prediction) == normalize_text(gold)


def response_losses(model: torch.nn.Module, tokenizer: Any, prompts: list[str], responses: list[str], template: str,
                    max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row teacher-forced mean cross-entropy over response tokens (NaN when none) and token counts."""
    from .scoring import example_losses
    from .text import collate, tokenize_batch

    enc = tokenize_batch(tokenizer, prompts, responses, template, max_length)
    b = collate(enc["input_ids"], enc["labels"], tokenizer.pad_token_id)
    device = next(model.parameters()).device
    loss, _, n = example_losses(model, b["input_ids"].to(device), b["labels"].to(device))
    return loss.float().cpu().numpy(), n.cpu().numpy()


class Evaluator:
    """Ray Data actor: per batch, greedy completions, exact match and response losses of each row's model.

    Rows name their model (``model`` column); the actor keeps the last model it loaded, so rows
    ordered by model load each one once per actor.
    """

    def __init__(self, tokenizer_dir: str, template: str, max_length: int, max_new_tokens: int, use_gpu: bool,
                 bf16: bool):
        from .models import load_tokenizer

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.template, self.max_length, self.max_new_tokens = template, max_length, max_new_tokens
        self.model_dir, self.model = "", None

    def _use(self, model_dir: str) -> None:
        from .models import load_model

        if model_dir != self.model_dir:
            self.model = load_model(model_dir, dtype=self.dtype).to(self.device).eval()
            self.model_dir = model_dir

    @torch.inference_mode()
    def generate(self, prompts: list[str]) -> list[str]:
        """Greedy completions of left-padded prompts (a prompt keeps its last max_length - max_new_tokens tokens)."""
        from .text import format_prompt

        tok = self.tokenizer
        keep = max(1, self.max_length - self.max_new_tokens)
        ids = [x[-keep:] for x in tok([format_prompt(self.template, p) for p in prompts],
                                      add_special_tokens=False)["input_ids"]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                  do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)
        return tok.batch_decode(out[:, width:], skip_special_tokens=True)

    def _score(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        prompts, responses = [str(x) for x in batch["prompt"]], [str(x) for x in batch["response"]]
        generations = self.generate(prompts)
        loss, n = response_losses(self.model, self.tokenizer, prompts, responses, self.template, self.max_length)
        predictions = [extract_answer(g) for g in generations]
        return {"model": [str(x) for x in batch["model"]], "index": batch["index"].tolist(),
                "id": [str(x) for x in batch["id"]], "source": [str(x) for x in batch["source"]],
                "gold": [str(x) for x in batch["gold"]], "prediction": predictions, "generation": generations,
                "correct": [answers_match(p, str(g)) for p, g in zip(predictions, batch["gold"])],
                "loss": loss.tolist(), "n_response": n.tolist()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        models = batch["model"]
        cuts = [0] + [i for i in range(1, len(models)) if models[i] != models[i - 1]] + [len(models)]
        out: dict[str, list] = {}
        for a, b in itertools.pairwise(cuts):  # each run of rows of one model
            self._use(str(models[a]))
            for k, v in self._score({k: v[a:b] for k, v in batch.items()}).items():
                out.setdefault(k, []).extend(v)
        return out


def _records(path: str) -> list[tuple[str, dict]]:
    """(where, row) pairs of one file or folder: JSONL (.gz), Parquet or a datasets.save_to_disk dir."""
    from .config import CorpusConfig
    from .corpus import CorpusError, discover

    try:
        fmt, files = discover(CorpusConfig(path=path))
    except CorpusError as e:
        raise EvaluateError(f"evaluation data: {e}") from None
    out: list[tuple[str, dict]] = []
    for f in files:
        if fmt == "jsonl":
            opener = gzip.open if f.endswith(".gz") else open
            with opener(f, "rt", encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, start=1):
                    if line.strip():
                        try:
                            out.append((f"{f}:{lineno}", json.loads(line)))
                        except json.JSONDecodeError as e:
                            raise EvaluateError(f"{f}:{lineno}: malformed JSON ({e.msg})") from None
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            out += [(f"{f} row {i}", r) for i, r in enumerate(pq.read_table(f).to_pylist())]
        else:
            import datasets

            d = datasets.load_from_disk(f)
            d = d["test"] if isinstance(d, datasets.DatasetDict) and "test" in d else d
            if isinstance(d, datasets.DatasetDict):
                raise EvaluateError(f"{f}: dataset dict without a 'test' split (splits: {list(d)})")
            out += [(f"{f} row {i}", r) for i, r in enumerate(d.to_list())]
    return out


def load_rows(path: str, cfg: EvaluateConfig) -> list[dict]:
    """Evaluation rows (index, id, source, prompt, response, gold), the first ``cfg.limit`` when set."""
    c = cfg.corpus
    rows = []
    for where, r in _records(path):
        if not isinstance(r, dict):
            raise EvaluateError(f"{where}: expected an object, got {type(r).__name__}")
        for col in (c.prompt, c.response):
            if not isinstance(r.get(col), str) or not r[col].strip():
                raise EvaluateError(f"{where}: field {col!r} is missing or not a non-empty string (fields: "
                                    f"{sorted(r)}); map columns with corpus.prompt / corpus.response")
        given = r.get(cfg.answer)
        gold = str(given).strip() if given is not None and str(given).strip() else extract_answer(r[c.response])
        if not gold:
            raise EvaluateError(f"{where}: no gold answer: add an {cfg.answer!r} field or end the response "
                                "with '#### <answer>'")
        source = r.get(c.source)
        rows.append({"index": len(rows), "id": str(r.get(c.id, len(rows))),
                     "source": c.default_source if source in (None, "") else str(source),
                     "prompt": r[c.prompt], "response": r[c.response], "gold": gold})
        if cfg.limit and len(rows) == cfg.limit:
            break
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
    """The HF model dir (a fine-tuning output's model/ when given that) and the output dir."""
    model = Path(cfg.model)
    if (model / "model" / "config.json").is_file():
        run_dir, model = model, model / "model"
    else:
        run_dir = model
    if not (model / "config.json").is_file():
        raise EvaluateError(f"{cfg.model}: not a model directory (no config.json) nor a fine-tuning output "
                            "(no model/config.json); run jobs/finetune.py first or pass --model")
    return str(model), cfg.output or str(run_dir / "eval")


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

    cfg = cfgs[0]
    for c in cfgs[1:]:
        if replace(c, model=cfg.model, output=cfg.output) != cfg:
            raise EvaluateError(f"{c.model}: evaluating several models at once needs configs that differ only in "
                                "model and output")
    paths = [resolve_paths(c) for c in cfgs]
    data = cfg.corpus.path or demo_paths()["eval"]
    rows = load_rows(data, cfg)
    use_gpu = resolve_gpu(cfg.use_gpu)
    actors = cfg.num_actors
    if use_gpu:  # no more actors than the cluster's GPUs can hold
        actors = min(actors, max(1, int(ray.cluster_resources().get("GPU", 0) // cfg.gpus_per_actor)))
    log(f"{len(rows)} rows of {data}; {len(cfgs)} model(s) ({paths[0][0]}{', ...' if len(cfgs) > 1 else ''}); "
        f"{actors} actors on {'GPU' if use_gpu else 'CPU'}")
    started = time.time()
    items = [{**r, "model": os.path.abspath(model)} for model, _ in paths for r in rows]
    batch = max(1, min(cfg.batch_size, math.ceil(len(items) / actors)))  # every actor gets work
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch))
    ds = ds.map_batches(
        Evaluator, batch_size=batch, batch_format="numpy",
        fn_constructor_kwargs=dict(tokenizer_dir=os.path.abspath(cfg.text.tokenizer or paths[0][0]),
                                   template=cfg.text.template,
                                   max_length=cfg.text.max_length, max_new_tokens=cfg.max_new_tokens,
                                   use_gpu=use_gpu, bf16=resolve_bf16(cfg.precision, use_gpu)),
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor if use_gpu else 0)
    by_model: dict[str, list[dict]] = {}
    for r in ds.take_all():
        by_model.setdefault(r["model"], []).append(r)
    seconds = round(time.time() - started, 2)
    return [_write(c, model_dir, out, data, sorted(by_model[os.path.abspath(model_dir)], key=lambda r: r["index"]),
                   seconds / len(cfgs))
            for c, (model_dir, out) in zip(cfgs, paths)]


def _write(cfg: EvaluateConfig, model_dir: str, out: str, data: str, results: list[dict], seconds: float) -> dict:
    """One model's metrics.json, metrics.md and predictions.jsonl; returns the metrics."""
    for r in results:
        r["loss"] = None if not math.isfinite(r["loss"]) else float(r["loss"])
        r["correct"] = bool(r["correct"])
    metrics = {"model": model_dir, "data": data, "rows": len(results), "max_new_tokens": cfg.max_new_tokens,
               **summarize(results), "seconds": round(seconds, 2), "config": to_dict(cfg)}
    os.makedirs(out, exist_ok=True)
    Path(out, "metrics.json").write_text(json.dumps(metrics, indent=2))
    Path(out, "metrics.md").write_text(markdown(metrics))
    with open(Path(out, "predictions.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps({k: r[k] for k in ("id", "source", "gold", "prediction", "correct", "loss",
                                                  "generation")}) + "\n")
    o = metrics["overall"]
    log(f"{model_dir}: exact match {100 * o['accuracy']:.1f}% ({o['correct']}/{o['n']}), mean response loss "
        f"{o['loss']}; wrote {out}/metrics.json, metrics.md")
    return metrics
