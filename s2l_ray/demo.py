"""The built-in demo: a multi-source maths SFT corpus from reasoning-gym and a local tokenizer.

Every response ends with ``#### <final answer>`` (GSM8K's convention); ``gsm_symbolic``
responses carry the step-by-step solution before it. Train, evaluation and target items come
from seeds ten million apart (reasoning-gym item i uses ``Random(seed + i)``), and any
evaluation or target prompt that also occurs in an earlier split is dropped.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .config import ConfigError, DemoConfig
from .text import PLAIN_CHAT_TEMPLATE

DEMO_ROOT = "runs/demo-data"  # where the jobs build the demo corpus and tokenizer by default
EVAL_SEED_OFFSET = 10_000_000
TARGET_SEED_OFFSET = 20_000_000
SOURCE_SEED_STRIDE = 1_000_003
EOS, PAD = "<|endoftext|>", "<|pad|>"


def _items(name: str, size: int, seed: int, args: dict | None = None) -> list[dict]:
    import reasoning_gym

    if size == 0:
        return []

    try:
        ds = reasoning_gym.create_dataset(name, size=size, seed=seed, **(args or {}))
        items = [ds[i] for i in range(size)]  # some settings fail only when an item is drawn
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"demo.generator_args.{name}: reasoning-gym refused {args}: {e}") from None
    rows = []
    for item in items:
        answer = str(item["answer"]).strip()
        if not answer:  # nothing to check an answer against (base_conversion of 0 answers "")
            continue
        cot = (item.get("metadata") or {}).get("answer_cot")
        if cot:  # the solution's own final line may format the answer differently ("6.0")
            response = cot.rsplit("####", 1)[0].rstrip() + f"\n#### {answer}"
        else:
            response = f"#### {answer}"
        rows.append({"source": name, "prompt": item["question"].strip(), "response": response, "answer": answer})
    return rows


def generate(cfg: DemoConfig) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """Train, evaluation, target and target-evaluation rows; the same config always gives the same rows.

    The target evaluation rows are the first ``target_eval_per_source`` held-out items of each target source
    (the evaluation rows of that source are their first ``eval_per_source``)."""
    sizes = cfg.train_sizes or [cfg.train_per_source] * len(cfg.sources)
    if len(sizes) != len(cfg.sources) or min(sizes, default=1) < 1:
        raise ConfigError(f"demo.train_sizes: give one count >= 1 per source ({len(cfg.sources)} sources: "
                          f"{cfg.sources}), got {cfg.train_sizes}")
    unknown = sorted(set(cfg.generator_args) - set(cfg.sources))
    if unknown:
        raise ConfigError(f"demo.generator_args: {unknown} are not among demo.sources {cfg.sources}")
    targets = cfg.target_sources or cfg.sources[:1]
    unknown = sorted(set(targets) - set(cfg.sources))
    if unknown:
        raise ConfigError(f"demo.target_sources: {unknown} are not among demo.sources {cfg.sources}")
    train, evaluation, target, target_eval = [], [], [], []
    for k, (name, size) in enumerate(zip(cfg.sources, sizes)):
        seed, args = cfg.seed + k * SOURCE_SEED_STRIDE, cfg.generator_args.get(name)
        seen: set[str] = set()
        for row in _items(name, size, seed, args):
            if row["prompt"] not in seen:  # small generators repeat themselves
                seen.add(row["prompt"])
                train.append(row)
        held_out = _items(name, max(cfg.eval_per_source, cfg.target_eval_per_source if name in targets else 0),
                          seed + EVAL_SEED_OFFSET, args)
        for i, row in enumerate(held_out):
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                if i < cfg.eval_per_source:
                    evaluation.append(row)
                if name in targets and i < cfg.target_eval_per_source:
                    target_eval.append(row)
        if name in targets:
            for row in _items(name, cfg.target_per_source, seed + TARGET_SEED_OFFSET, args):
                if row["prompt"] not in seen:
                    seen.add(row["prompt"])
                    target.append(row)
    return train, evaluation, target, target_eval


def pretraining_rows(sources: list[str], per_source: int, seed: int,
                     generator_args: dict[str, dict] | None = None) -> list[dict]:
    """Maths texts for pretraining a base: ``per_source`` items of each reasoning-gym generator (question and
    worked answer; ``generator_args`` per source, as in the demo), item i of source k from
    ``Random(seed + k * SOURCE_SEED_STRIDE + i)``."""
    args = generator_args or {}
    return [{"prompt": r["prompt"], "response": r["response"], "source": name} for k, name in enumerate(sources)
            for r in _items(name, per_source, seed + k * SOURCE_SEED_STRIDE, args.get(name))]


def train_tokenizer(texts: list[str], vocab_size: int, path: str, split_digits: bool = False):
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a transformers tokenizer; with
    ``split_digits`` no token holds more than one digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    fast.chat_template = PLAIN_CHAT_TEMPLATE  # chat rows in the plain template's wording
    fast.save_pretrained(path)
    return fast


FORMAT = 3  # of the files build() writes: a folder built by an earlier format is rebuilt


def fingerprint(cfg: DemoConfig) -> str:
    return hashlib.sha256(json.dumps([FORMAT, cfg.__dict__], sort_keys=True).encode()).hexdigest()[:16]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write ``rows``; a file already holding exactly them is left as it is (its modification time, and so
    the stored corpus made from it, stays valid when a changed config rebuilds the same rows)."""
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build(cfg: DemoConfig, root: str) -> dict[str, str]:
    """Write ``train.jsonl``, ``train_chat.jsonl`` (the same rows as one-turn conversations), ``eval.jsonl``,
    ``eval_gsm8k.jsonl`` (the ``gsm_symbolic`` held-out rows in GSM8K's own schema: ``question``,
    ``answer`` ending in ``#### N``), ``target.jsonl`` and ``target_chat.jsonl`` (examples of
    ``target_sources`` for ``--target``), ``eval_target.jsonl`` (their held-out items: the one-task
    evaluation set) and ``tokenizer/`` under ``root`` (reused when present).

    Returns their paths. A folder built from another config is rebuilt.
    """
    base = Path(root)
    paths = {"train": str(base / "train.jsonl"), "train_chat": str(base / "train_chat.jsonl"),
             "eval": str(base / "eval.jsonl"), "eval_gsm8k": str(base / "eval_gsm8k.jsonl"),
             "target": str(base / "target.jsonl"), "target_chat": str(base / "target_chat.jsonl"),
             "eval_target": str(base / "eval_target.jsonl"),
             "tokenizer": str(base / "tokenizer")}
    stamp = base / "demo.json"
    fp = fingerprint(cfg)
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fp:
        return paths
    base.mkdir(parents=True, exist_ok=True)
    train, evaluation, target, target_eval = generate(cfg)
    _write_jsonl(base / "train.jsonl", train)
    _write_jsonl(base / "eval.jsonl", evaluation)
    _write_jsonl(base / "target.jsonl", target)
    _write_jsonl(base / "eval_target.jsonl", target_eval)
    for name, rows in (("train_chat.jsonl", train), ("target_chat.jsonl", target)):
        _write_jsonl(base / name, [{"source": r["source"], "messages": [
            {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]} for r in rows])
    _write_jsonl(base / "eval_gsm8k.jsonl", [{"question": r["prompt"], "answer": r["response"]}
                                             for r in evaluation if r["source"] == "gsm_symbolic"])
    train_tokenizer([r["prompt"] + "\n" + r["response"] for r in train], cfg.vocab_size, paths["tokenizer"],
                    cfg.split_digits)
    stamp.write_text(json.dumps({"fingerprint": fp, "train": len(train), "eval": len(evaluation),
                                 "target": len(target)}))
    return paths


def write_word_problems(path: str, n: int, seed: int = 0, sources: int = 10) -> int:
    """N templated word problems with worked answers (about 250 bytes a row) as one JSONL file, sorted
    by source (``s0`` .. ``s<sources-1>``); fast at any size, for benchmarks. Returns the file size."""
    import random

    rng = random.Random(seed)
    names = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
    things = ["apples", "books", "marbles", "stamps", "coins", "pencils", "shells", "cards"]
    with open(path, "w") as f:
        for i in range(n):
            a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 30)
            who, what = rng.choice(names), rng.choice(things)
            total = a + b
            left = total - total // c
            f.write(json.dumps({
                "id": f"r{i}", "source": f"s{i * sources // n}",
                "prompt": f"{who} has {a} {what} and buys {b} more. Then {who} gives away a {c}th of them, rounded "
                          f"down. How many {what} does {who} have left?",
                "response": f"{a} + {b} = {total}. {total} // {c} = {total // c}. {total} - {total // c} = {left}."
                            f"\n#### {left}"}) + "\n")
    return os.path.getsize(path)

