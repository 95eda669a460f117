"""Prompt template, tokenisation with response-only labels, length bucketing and grouping, collation."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


def format_prompt(template: str, prompt: str) -> str:
    return template.format(prompt=prompt)


def tokenize_batch(tokenizer: Any, prompts: list[str], responses: list[str], template: str,
                   max_length: int) -> dict[str, list]:
    """Token ids and labels for each (prompt, response); labels are -100 on prompt tokens.

    Prompt and response are tokenised separately (no merge across the boundary) and the
    response ends with EOS. Sequences longer than ``max_length`` are cut on the right, so an
    over-long prompt leaves no response tokens (``n_response`` 0): callers must check.
    """
    p_ids = tokenizer([format_prompt(template, p) for p in prompts], add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out: dict[str, list] = {"input_ids": [], "labels": [], "n_response": [], "truncated": []}
    for p, r in zip(p_ids, r_ids):
        r = list(r) + ([eos] if eos is not None else [])
        ids = (list(p) + r)[:max_length]
        n_prompt = min(len(p), len(ids))
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["n_response"].append(len(ids) - n_prompt)
        out["truncated"].append(len(p) + len(r) > max_length)
    return out


def collate(input_ids: list, labels: list, pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence (or ``pad_to``); padded labels are -100, mask 0."""
    lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
    width = int(lengths.max(initial=0)) if pad_to is None else pad_to
    mask = np.arange(width) < lengths[:, None]
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    lab = np.full(mask.shape, IGNORE_INDEX, dtype=np.int64)
    if len(input_ids):
        ids[mask] = np.concatenate([np.asarray(x, dtype=np.int64) for x in input_ids])
        lab[mask] = np.concatenate([np.asarray(y, dtype=np.int64) for y in labels])
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(lab),
            "attention_mask": torch.from_numpy(mask.astype(np.int64))}


def length_buckets(lengths: np.ndarray | list[int], max_tokens: int) -> list[np.ndarray]:
    """Group row indices into batches of similar length with at most ``max_tokens`` padded tokens.

    Rows are sorted by length; a batch grows while ``len(batch) * longest <= max_tokens``
    (a single row longer than ``max_tokens`` forms its own batch).
    """
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or (i - start + 1) * lengths[order[i]] > max_tokens:
            batches.append(order[start:i])
            start = i
    return batches


def group_by_length(lengths: np.ndarray | list[int], micro_batch_size: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Cut one window of rows into micro-batches of similar length, in random order.

    Rows are sorted by length and cut into consecutive micro-batches of ``micro_batch_size``
    rows (the longest rows form the last, possibly smaller, one); their order is then shuffled
    with ``rng``. Training sees the same rows per window as without grouping, with less padding.
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    chunks = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    return [chunks[j] for j in rng.permutation(len(chunks))]
