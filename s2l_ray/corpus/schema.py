"""Normalising one record of any supported schema into ``{id, source, prompt, response, messages, drop}``."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..config import CorpusConfig
from .errors import CorpusError, RowError
from .readers import records

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "model": "assistant", "system": "system", "tool": "tool", "function": "tool", "ipython": "tool"}
# Column pairs of other tools' schemas, read when the default prompt/response columns are absent:
# GSM8K (question, answer), MATH (problem, solution), Alpaca and MathInstruct (instruction, output).
SCHEMAS = (("question", "answer"), ("problem", "solution"), ("instruction", "output"))


def row_id(source: str, prompt: str, response: str) -> str:
    """The id derived from a row's content when the corpus gives none (``response``: a chat row's JSON)."""
    return hashlib.sha1("\x1f".join((source, prompt, response)).encode()).hexdigest()[:20]


def _conversation(turns: Any, col: str) -> list[dict]:
    """``{role, content}`` turns of a messages or ShareGPT (``{from, value}``) column."""
    if not isinstance(turns, list) or not turns or not all(isinstance(m, dict) for m in turns):
        raise RowError(f"field {col!r} must be a non-empty list of {{role, content}} (or ShareGPT {{from, value}}) "
                       "objects")
    out = []
    for i, m in enumerate(turns):
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in ROLES:
            raise RowError(f"field {col!r} turn {i} has role {role!r}; expected one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"field {col!r} turn {i} content must be a string, got {type(content).__name__}")
        out.append({"role": ROLES[role], "content": content})
    return out


def _chat_drop(conv: list[dict]) -> str | None:
    answers = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    if not answers or any(not conv[i]["content"].strip() for i in answers):
        return "empty_response"
    asks = [m for m in conv if m["role"] != "assistant"]
    if not any(m["role"] != "assistant" for m in conv[:answers[0]]) or any(not m["content"].strip() for m in asks):
        return "empty_prompt"
    return None


def columns_of(rec: dict, cfg: CorpusConfig) -> dict[str, str]:
    """The columns of ``rec`` that ``normalise`` reads: ``{"messages": col}`` for a chat row (a ``corpus.messages``
    or ``conversations`` column, and no prompt column), else ``{"prompt", "response"}`` (with the default names
    absent, the first pair of ``SCHEMAS`` present) and, for Alpaca's ``instruction``, its ``"query"`` column
    ``input`` when the row has one."""
    chat_col = next((c for c in (cfg.messages, "conversations") if rec.get(c) is not None), None)
    if chat_col is not None and cfg.prompt not in rec:
        return {"messages": chat_col}
    pcol, rcol = cfg.prompt, cfg.response
    if pcol not in rec and (pcol, rcol) == ("prompt", "response"):  # another tool's own schema
        pcol, rcol = next(((a, b) for a, b in SCHEMAS if a in rec and b in rec), (pcol, rcol))
    return {"prompt": pcol, "response": rcol} | ({"query": "input"} if pcol == "instruction" and "input" in rec else {})


def normalise(rec: Any, cfg: CorpusConfig) -> dict:
    """One record as ``{id, source, prompt, response, messages, drop}``: ``messages`` the JSON of a chat
    row's turns (else None); ``drop`` the reason the row is dropped (empty prompt or response) or None.
    A malformed record raises RowError.

    A chat row (a ``corpus.messages`` or ``conversations`` column, and no prompt column) has as
    ``prompt`` and ``response`` its last asking turn before its last assistant turn, and that turn.
    With the default column names and no ``prompt`` column, the pairs of ``SCHEMAS`` are tried.
    """
    if not isinstance(rec, dict):
        raise RowError(f"expected a JSON object, got {type(rec).__name__}")
    cols = columns_of(rec, cfg)
    messages = drop = None
    if "messages" in cols:
        chat_col = cols["messages"]
        conv = _conversation(rec[chat_col], chat_col)
        drop = _chat_drop(conv)
        answers = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
        last = answers[-1] if answers else len(conv)
        prompt = next((m["content"] for m in reversed(conv[:last]) if m["role"] != "assistant"), "")
        response = conv[last]["content"] if answers else ""
        messages = json.dumps(conv, ensure_ascii=False)
    else:
        pcol, rcol = cols["prompt"], cols["response"]
        for col in (pcol, rcol):
            if col not in rec:
                raise RowError(f"missing field {col!r} (fields: {sorted(rec)}); set corpus.prompt / corpus.response "
                               f"to map columns, or give a {cfg.messages!r} chat column")
        prompt, response = rec[pcol], rec[rcol]
        for name, val in ((pcol, prompt), (rcol, response)):
            if not isinstance(val, str):
                raise RowError(f"field {name!r} must be a string, got {type(val).__name__}")
        if "query" in cols and isinstance(rec[cols["query"]], str) and rec[cols["query"]]:
            prompt = f"{prompt}\n{rec[cols['query']]}"  # Alpaca: the instruction, a newline, its input (as LLaMA-Factory)
        drop = "empty_prompt" if not prompt.strip() else "empty_response" if not response.strip() else None
    source = rec.get(cfg.source)
    source = cfg.default_source if source is None or source == "" else str(source)
    rid = rec.get(cfg.id)
    rid = row_id(source, "" if messages else prompt, messages or response) if rid is None or rid == "" else str(rid)
    return {"id": rid, "source": source, "prompt": prompt, "response": response, "messages": messages, "drop": drop}


def normalised(cfg: CorpusConfig) -> Iterator[tuple[str, dict]]:
    """``(where, normalised row)`` of every record in input order, in this process (``records``)."""
    for where, rec in records(cfg):
        try:
            yield where, normalise(rec, cfg)
        except RowError as e:
            raise CorpusError(f"{where}: {e}") from None


def check_records(cfg: CorpusConfig) -> None:
    """Read the whole corpus once and raise its first malformed record's CorpusError, if any."""
    for _ in normalised(cfg):
        pass


def sample_texts(cfg: CorpusConfig, n: int, seed: int) -> list[str]:
    """The text of a uniform sample of at most n rows (reservoir sampling over one pass, which also
    checks every record), for training a tokenizer on the corpus."""
    rng = np.random.default_rng(seed)
    sample: list[str] = []
    for i, (_, r) in enumerate(normalised(cfg)):
        text = "\n".join(m["content"] for m in json.loads(r["messages"])) if r["messages"] else \
            r["prompt"] + "\n" + r["response"]
        if len(sample) < n:
            sample.append(text)
        elif (j := rng.integers(0, i + 1)) < n:
            sample[j] = text
    if not sample:
        raise CorpusError(f"{cfg.path}: the corpus is empty")
    return sample
