"""Reading and comparing final answers in the usual maths-benchmark formats (GSM8K, MATH, reasoning-gym).

A gold answer (:func:`extract_gold`) is, first that applies: the first line after the last ``####``
(GSM8K); the content of the last ``\\boxed{}``/``\\fbox{}`` (MATH, nested braces kept); the whole
text when it is *short* (one line of at most 60 characters: ``True``, ``-3, 1, 5``, ``x = 2``)
unless it is a sentence with a number (three or more words of two or more letters, not counting
LaTeX commands: ``He has 5 apples.``; a comma list of single words, ``set, 2006, sir, to``, is a
list, not a sentence); the last number; ``""``.

A prediction (:func:`extract_prediction`) is first cut at the earliest stop string, then, first
that applies: ``####``; ``\\boxed{}``; the last "answer is" / "answer:" phrase (covers "The answer
is", "The final answer is", "Final Answer:", case-insensitive) followed by text on its line, taken
up to the end of that sentence (a period followed by a space or the end) without ``$``/``**``
wrappers, and a number followed only by words (``18 apples``) reduced to the number; the whole
text when it is short and a number or a comma list of numbers (``-3, 1, 5``); the last number;
the whole text when short; ``""``.

Two answers match (:func:`answers_match`) when both parse as numbers and are equal (``12.50`` =
``12.5``, ``1,000`` = ``1000``, ``3/4`` = ``0.75`` = ``\\frac{3}{4}`` = ``\\dfrac34``; ``$``, ``%``,
``^\\circ``, ``\\!``, ``\\,``, a trailing period, ``**`` and a ``x =`` prefix ignored; ``−`` is a minus),
else when their normalised strings are equal (case, spaces, ``\\text{}``, ``$...$``, and ``×``
``\\times`` ``\\cdot`` ``*`` or ``x`` between digits ignored), else when both are comma lists
(bare or in ``[...]``; not in ``(...)``, which are tuples or intervals) whose items match in some
order (with ``ordered_lists``, in the same order: sorting and reversal tasks). An empty gold never matches. ``yes`` is not ``True``: only case differs between equal strings.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

SHORT = 60  # the most characters of a one-line text that is its own answer

_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?<![\d.,])\$?(?:\d(?:[\d,]*\d)?(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?%?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_FRAC = re.compile(r"\\[dt]?frac\s*(\{[^{}]*\}|\w)\s*(\{[^{}]*\}|\w)")
_TEXT = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_PHRASE = re.compile(r"\banswer\s*(?:is\b|:)", re.IGNORECASE)
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
_UNITS = re.compile(rf"({_NUMBER.pattern})\s+[A-Za-z][A-Za-z\s]*")


def _short(text: str) -> bool:
    return 0 < len(text) <= SHORT and "\n" not in text


def _after_hashes(text: str) -> str:
    return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip() if "####" in text else ""


def _last_boxed(text: str) -> str:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces), else ``""`` (also if unclosed)."""
    starts = list(_BOXED.finditer(text))
    if not starts:
        return ""
    depth, begin = 1, starts[-1].end()
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
    return ""


def _after_phrase(text: str) -> str:
    """What follows the last "answer is" / "answer:" on its line, up to the end of its sentence."""
    found = list(_PHRASE.finditer(text))
    if not found:
        return ""
    rest = text[found[-1].end():].split("\n", 1)[0].lstrip(" :")
    rest = re.split(r"\.(?=\s|$)", rest, maxsplit=1)[0]
    rest = rest.strip().strip("*$").strip()
    units = _UNITS.fullmatch(rest)
    return units.group(1) if units else rest


def _last_number(text: str) -> str:
    numbers = _NUMBER.findall(text.replace("−", "-"))
    return numbers[-1].strip() if numbers else ""


def _first(*candidates: str) -> str:
    return next((c for c in candidates if c), "")


def extract_gold(text: str) -> str:
    """The gold answer of a reference solution or answer field (rules in the module docstring)."""
    s = text.strip()
    items = _items(s) or []
    listed = len(items) > 1 and all(len(x.split()) == 1 for x in items)  # a list of words, not a sentence
    sentence = len(_WORD.findall(s)) >= 3 and bool(_last_number(s)) and not listed
    return _first(_after_hashes(s), _last_boxed(s), s if _short(s) and not sentence else "", _last_number(s))


def extract_prediction(text: str, stop: Sequence[str] = ()) -> str:
    """A generation's final answer, read only before the first stop string (rules in the module docstring)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    s = text[:cut].strip()
    items = _items(s) if _short(s) else None
    numeric = s if items and all(parse_number(x) is not None for x in items) else ""
    return _first(_after_hashes(s), _last_boxed(s), _after_phrase(s), numeric, _last_number(s),
                  s if _short(s) else "")


def _frac(m: re.Match) -> str:
    def part(x: str) -> str:
        x = x[1:-1].strip() if x.startswith("{") else x
        return x if re.fullmatch(r"-?[\w.]+", x) else f"({x})"

    glue = " " if m.start() and m.string[m.start() - 1].isdigit() else ""  # 1\frac12 is not 11/2
    return f"{glue}{part(m.group(1))}/{part(m.group(2))}"


def _clean(text: str) -> str:
    """Common LaTeX and markup removed: delimiters, spacing, ``\\text{}``, ``\\frac``, degrees, a ``x =`` prefix."""
    s = text.strip().replace("−", "-").replace("\\$", "$").replace("\\%", "%")
    s = re.sub(r"\\[!,;]|\\(?:left|right)(?![a-zA-Z])|\^\s*\{?\\circ\}?", "", s)
    s = _FRAC.sub(_frac, _TEXT.sub(r"\1", s))
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s.strip())
    s = re.sub(r"^[\s$*]+|[\s$*.]+$", "", s)
    if s.count("=") == 1:
        s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)
    return s


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number (integer, decimal, fraction, thousands commas, ``$``, ``%``), else None."""
    s = re.sub(r"\s*([/%])\s*", r"\1", _clean(text).replace("$", "")).removesuffix("%")
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
    """A non-numeric answer for comparison: lower case, no spaces (one between digits), one spelling of
    multiplication, ``x^{2}`` = ``x^2``."""
    s = _clean(text).lower()
    s = re.sub(r"\\times(?![a-z])|×|·|\\cdot(?![a-z])", "*", s)
    s = re.sub(r"(?<=\d)\s*x\s*(?=\d)", "*", s)
    s = re.sub(r"\{(\w)\}", r"\1", s)
    return " ".join(re.sub(r"\s+", "", x) for x in re.split(r"(?<=\d)\s+(?=\d)", s))  # 1 1/2 is not 11/2


def _items(text: str) -> list[str] | None:
    """The items of a bare or ``[...]`` comma list, else None (other brackets: tuples, intervals, sets)."""
    s = _clean(text)
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    items = [x.strip() for x in s.split(",")]
    return None if re.search(r"[(){}\[\]]", s) or not all(items) else items


def _same(a: str, b: str) -> bool:
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return x == y
    return normalize_text(a) == normalize_text(b)


def answers_match(prediction: str, gold: str, ordered_lists: bool = False) -> bool:
    """Exact match of two final answers: as numbers, else as normalised strings, else as lists whose items
    match in some order (``ordered_lists``: in the same order, for sorting and reversal tasks)."""
    if not normalize_text(gold):
        return False
    if _same(prediction, gold):
        return True
    p, g = _items(prediction), _items(gold)
    if not p or not g or len(p) != len(g) or len(g) < 2:
        return False
    if ordered_lists:
        return all(_same(x, y) for x, y in zip(p, g))
    rest = list(g)
    for x in p:
        j = next((j for j, y in enumerate(rest) if _same(x, y)), None)
        if j is None:
            return False
        rest.pop(j)
    return True
