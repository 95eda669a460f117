"""Rows to token ids with response-only labels, as the model's own tokenizer intends; batching helpers.

One function, ``encode``, turns corpus rows into ``input_ids`` and the token spans that carry
labels; proxy training, scoring, fine-tuning and the evaluation loss all use it (and the
evaluation prompt is the same ids cut before the last span), so they can never disagree.

- **Plain rows** (prompt, response): the text ``template.format(prompt=...) + response`` is
  tokenised as one string with the tokenizer's own special-token policy (a BOS where it adds
  one), and EOS is appended unless the tokenizer already ends with it. The response tokens are
  those overlapping the response's characters (offsets), so a template ending in a space gives
  no lone-space token: the space merges into the response's first token, as in pretraining.
- **Chat rows** (a list of ``{role, content}`` turns): rendered by ``apply_chat_template`` with
  the tokenizer's chat template (or ``text.chat_template``) and tokenised like
  ``apply_chat_template(tokenize=True)`` does (no extra specials: the template carries them).
  Every assistant turn is labelled: its content and the end-of-turn token(s) the template puts
  after it, found by rendering the conversation up to that turn.

Labels are ``IGNORE_INDEX`` outside the spans; a sequence longer than ``max_length`` is cut on
the right and its spans clipped (callers check ``n_response``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100

# ``text.chat_template: plain``: the plain template's wording as a chat template, for tokenizers
# that have none (the demo's): "Question: ..." per user turn, "Answer: ..." + EOS per assistant turn.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ 'Answer: ' + m['content'] + eos_token + '\n' }}"
    "{% elif m['role'] == 'system' %}{{ m['content'] + '\n' }}"
    "{% else %}{{ 'Question: ' + m['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Answer: ' }}{% endif %}"
)


class TextError(ValueError):
    """A row cannot be tokenised as configured (no chat template, a template that is not incremental)."""


def chat_template(tokenizer: Any, setting: str) -> str | None:
    """The Jinja chat template to use: ``""`` the tokenizer's own (None if it has none), ``plain`` the
    built-in plain one, else a ``.jinja`` file's text or the template string itself."""
    if not setting:
        return getattr(tokenizer, "chat_template", None) or None
    if setting == "plain":
        return PLAIN_CHAT_TEMPLATE
    if setting.endswith((".jinja", ".j2")):
        path = Path(setting)
        if not path.is_file():
            raise TextError(f"text.chat_template: file not found: {setting}")
        return path.read_text()
    return setting


def stop_prefix(template: str) -> str:
    """The plain template's text before ``{prompt}``, stripped (``Question:``): where a model that runs
    on into an invented next question should stop."""
    return template.split("{prompt}", 1)[0].strip()


def _offsets(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> tuple[list[list[int]], list[np.ndarray]]:
    encodings = _backend(tokenizer).encode_batch(texts, add_special_tokens=add_special_tokens)
    return [e.ids for e in encodings], [np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2) for e in encodings]


def _token_spans(offsets: np.ndarray, char_spans: list[tuple[int, int]]) -> list[int]:
    """Token ranges overlapping each character span (flattened start, end pairs); specials with empty
    offsets count only where they lie inside a span."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    real = ends > starts
    out: list[int] = []
    for cs, ce in char_spans:
        inside = np.flatnonzero(real & (ends > cs) & (starts < ce))
        if len(inside):
            out += [int(inside[0]), int(inside[-1]) + 1]
    return out


def _finish(ids: list[int], spans: list[int], max_length: int, out: dict[str, list]) -> None:
    cut = ids[:max_length]
    kept: list[int] = []
    for s, e in zip(spans[::2], spans[1::2]):
        e = min(e, len(cut))
        if s < e:
            kept += [s, e]
    out["input_ids"].append(cut)
    out["spans"].append(kept)
    out["n_response"].append(sum(e - s for s, e in zip(kept[::2], kept[1::2])))
    out["truncated"].append(len(ids) > max_length)


def _backend(tokenizer: Any) -> Any:
    if not getattr(tokenizer, "is_fast", False):
        raise TextError(f"{type(tokenizer).__name__} is not a fast tokenizer: token offsets are needed to find the "
                        "response tokens; save the tokenizer as a fast one (tokenizer.json)")
    return tokenizer.backend_tokenizer


def _plain(tokenizer: Any, prompts: list[str], responses: list[str], template: str, max_length: int,
           out: dict[str, list]) -> None:
    heads = [template.format(prompt=p) for p in prompts]
    # the fast tokenizer's own batch encoding (what tokenizer(texts) runs), without building offset lists
    encodings = _backend(tokenizer).encode_batch([h + r for h, r in zip(heads, responses)], add_special_tokens=True)
    eos = tokenizer.eos_token_id
    for head, enc in zip(heads, encodings):
        ids = enc.ids
        start = enc.char_to_token(len(head))  # the token holding the response's first character
        if start is None:  # that character was normalised away: the first token ending after it
            start = next((i for i, (_, e) in enumerate(enc.offsets) if e > len(head)), len(ids))
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        _finish(ids, [start, len(ids)], max_length, out)


def _chat(tokenizer: Any, conversations: list[list[dict]], template: str | None, max_length: int,
          out: dict[str, list], where: list[str]) -> None:
    if template is None:
        raise TextError(f"{where[0]}: a chat row, but the tokenizer has no chat template; set text.chat_template "
                        "to 'plain' (the plain template's wording), a .jinja file or a template string")

    def render(msgs: list[dict], generation: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation)

    texts, char_spans = [], []
    for msgs, at in zip(conversations, where):
        full = render(msgs)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            head, upto = render(msgs[:i], generation=True), render(msgs[:i + 1])
            if not (upto.startswith(head) and full.startswith(upto)):
                raise TextError(f"{at}: the chat template renders the turns before assistant turn {i} differently "
                                "once later turns follow, so its tokens cannot be told apart; set "
                                "text.chat_template to a template that renders a conversation incrementally")
            spans.append((len(head), len(upto.rstrip())))
        texts.append(full)
        char_spans.append(spans)
    all_ids, all_offsets = _offsets(tokenizer, texts, False)
    for ids, offsets, spans in zip(all_ids, all_offsets, char_spans):
        _finish(list(ids), _token_spans(offsets, spans), max_length, out)


def encode(tokenizer: Any, prompts: list[str], responses: list[str], conversations: list[list[dict] | None],
           *, template: str, chat: str | None, max_length: int, where: list[str] | None = None,
           train_on_prompt: bool = False) -> dict[str, list]:
    """Token ids and label spans of each row: ``conversations[i]`` (a chat row) or else
    ``(prompts[i], responses[i])`` with the plain ``template``; ``chat`` is the chat template
    (``text.chat_template`` resolved by ``chat_template``). ``where`` names each row in errors.
    With ``train_on_prompt`` every token after the first carries a label (language modelling of
    the whole text, as in pretraining), not only the responses.

    Returns lists ``input_ids``, ``spans`` (flattened token ``[start, end)`` pairs that carry labels),
    ``n_response`` (labelled tokens) and ``truncated``, in row order.
    """
    n = len(prompts)
    where = where or [f"row {i}" for i in range(n)]
    chat_rows = [i for i in range(n) if conversations[i] is not None]
    plain_rows = [i for i in range(n) if conversations[i] is None]
    parts = []
    for rows, fill in ((plain_rows, lambda o: _plain(tokenizer, [prompts[i] for i in plain_rows],
                                                     [responses[i] for i in plain_rows], template, max_length, o)),
                       (chat_rows, lambda o: _chat(tokenizer, [conversations[i] for i in chat_rows], chat, max_length,
                                                   o, [where[i] for i in chat_rows]))):
        o: dict[str, list] = {"input_ids": [], "spans": [], "n_response": [], "truncated": []}
        if rows:
            fill(o)
        parts.append((rows, o))
    out: dict[str, list] = {k: [None] * n for k in ("input_ids", "spans", "n_response", "truncated")}
    for rows, o in parts:
        for j, i in enumerate(rows):
            for k in out:
                out[k][i] = o[k][j]
    if train_on_prompt:
        out["spans"] = [[1, len(ids)] if len(ids) > 1 else [] for ids in out["input_ids"]]
        out["n_response"] = [max(0, len(ids) - 1) for ids in out["input_ids"]]
    return out


def labels_from(ids: list[int], spans: list[int]) -> list[int]:
    """Labels of one row: its ids inside the spans, IGNORE_INDEX elsewhere."""
    labels = [IGNORE_INDEX] * len(ids)
    for s, e in zip(spans[::2], spans[1::2]):
        labels[s:e] = ids[s:e]
    return labels


def prompt_ids(ids: list[int], spans: list[int]) -> list[int]:
    """The ids before the last labelled span: what a model is given to generate the last response."""
    return list(ids[:spans[-2]]) if spans else list(ids)


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


def pack(input_ids: list, labels: list) -> dict[str, torch.Tensor]:
    """Rows concatenated into one sequence of their real tokens, no padding: ``position_ids`` restart at 0 with each
    row, from which transformers confines attention to each row (``masking_utils.find_packed_sequence_indices``:
    a block-diagonal causal mask under SDPA); each row's first label is IGNORE_INDEX, so that no row's first token
    is predicted from the row before it (padded, a row's first label is never predicted either). The mean loss over
    the labelled tokens is then the padded batch's."""
    lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
    ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in input_ids])
    lab = np.concatenate([np.asarray(y, dtype=np.int64) for y in labels])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    lab[starts] = IGNORE_INDEX
    pos = np.arange(len(ids)) - np.repeat(starts, lengths)
    return {"input_ids": torch.from_numpy(ids)[None], "labels": torch.from_numpy(lab)[None],
            "position_ids": torch.from_numpy(pos)[None]}


def training_batch(input_ids: list, spans: list, pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """One training micro-batch of rows (``encode``'s ids and label spans): packed (``pack``) or right-padded
    (``collate``); the two give the same loss."""
    labels = [labels_from(x, sp) for x, sp in zip(input_ids, spans)]
    return pack(input_ids, labels) if packed else collate(input_ids, labels, pad_id)


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
