"""Rows dropped per reason, and the errors that ``corpus.strict`` makes of them."""
from __future__ import annotations

from .errors import CorpusError

DROP_REASONS = ("empty_prompt", "empty_response", "duplicate_id", "no_response_tokens")


class Drops:
    """Rows dropped per reason: counts and the first few ids."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(DROP_REASONS, 0)
        self.examples: dict[str, list[str]] = {r: [] for r in DROP_REASONS}

    def add(self, reason: str, rid: str, n: int = 1) -> None:
        self.counts[reason] += n
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(rid)

    def merge(self, counts: dict, examples: dict) -> None:
        for r in DROP_REASONS:
            self.counts[r] += counts[r]
            self.examples[r] = (self.examples[r] + examples[r])[:5]

    def summary(self) -> str:
        return ", ".join(f"{n} {reason.replace('_', ' ')} (ids {self.examples[reason]})"
                         for reason, n in self.counts.items() if n)


STRICT_MESSAGES = {
    "empty_prompt": "the prompt is empty", "empty_response": "the response is empty", "duplicate_id": "duplicate id",
    "no_response_tokens": "no response token is left after truncation to text.max_length (raise it or shorten the "
                          "prompt)"}


def strict_error(where: str, reason: str, rid: str) -> CorpusError:
    return CorpusError(f"{where}: {STRICT_MESSAGES[reason]} (id {rid!r}); corpus.strict is true (false drops such "
                       "rows and counts them)")


def drop_summary(stats: dict) -> str:
    """One line on the rows a corpus stage dropped, or "" when none was."""
    d = Drops()
    d.merge(stats["dropped"], {r: stats["dropped_ids"].get(r, []) for r in DROP_REASONS})
    return d.summary()
