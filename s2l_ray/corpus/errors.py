"""The corpus stage's errors."""


class CorpusError(ValueError):
    """The corpus is missing, empty or malformed; the message names the file, row and field."""


class RowError(ValueError):
    """A malformed record; the caller adds where it is."""
