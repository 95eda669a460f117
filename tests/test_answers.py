"""Final answers: extraction of gold and predicted answers in benchmark formats, and exact match."""
from __future__ import annotations

from fractions import Fraction

import pytest

from s2l_ray.answers import answers_match, extract_gold, extract_prediction, normalize_text, parse_number

GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
LONG_GOLD = ("First we add the two amounts, which gives 30 in total. Then we take away the 12 that were lost, "
             "and what is left over is 18.")
RUNAWAY = "The answer is 18.\nQuestion: What is 5+5?\nAnswer: The answer is 10."


@pytest.mark.parametrize("text, gold, matches", [
    (GSM8K_ANSWER, "72", ["72", "72.0"]),
    ("Total: 500 + 500\n#### 1,000", "1,000", ["1000", "1,000.00"]),
    ("#### \n42", "42", ["42"]),
    ("So the probability is $\\boxed{\\frac{3}{4}}$.", "\\frac{3}{4}", ["0.75", "3/4", "\\dfrac34"]),
    ("We get $\\boxed{2^{10}}$ subsets.", "2^{10}", ["2^{10}", "$2^{10}$"]),
    ("first \\boxed{1}, then \\fbox{ 7 }", "7", ["7"]),
    ("True", "True", ["true", "TRUE"]),
    ("-3, 1, 5", "-3, 1, 5", ["-3,1,5", "[-3, 1, 5]", "5, -3, 1"]),
    ("x = 2", "x = 2", ["x=2", "2"]),
    ("New York City", "New York City", ["new york city"]),
    ("He has 5 apples left.", "5", ["5"]),
    ("set, 2006, sir, to, was", "set, 2006, sir, to, was", ["set,2006, sir, to, was"]),  # a list, not a sentence
    ("between 1/2 and 3 / 4 cups", "3 / 4", ["0.75"]),
    ("\\frac{3}{4} \\text{ cm}", "\\frac{3}{4} \\text{ cm}", ["\\frac34 cm"]),
    (LONG_GOLD, "18", ["18"]),
    ("no digits in this reference solution at all, it just goes on and on and on and on", "", []),
])
def test_extract_gold(text, gold, matches):
    assert extract_gold(text) == gold
    assert all(answers_match(m, gold) for m in matches)


@pytest.mark.parametrize("text, stop, prediction", [
    (RUNAWAY, ["Question:"], "18"),
    (RUNAWAY, [], "10"),  # without the stop the invented next question is scored
    ("The answer is 18.\nQ: What is 5+5?", ["Question:", "Q:"], "18"),
    ("Step 1: 3 + 4 = 7\n#### 7\nQuestion: 1 + 1", ["Question:"], "7"),
    ("... so the answer is $\\boxed{\\frac{3}{4}}$. The answer is 2.", [], "\\frac{3}{4}"),
    ("**The final answer is 42**", [], "42"),
    ("Final Answer: The final answer is $18.00$. I hope it is correct.", [], "18.00"),
    ("The answer is: **3.5**.", [], "3.5"),
    ("She has 20 left, so the answer is 18 apples.", [], "18"),
    ("Answer: True", [], "True"),
    ("The answer is\n42", [], "42"),
    ("She pays $18.00 in all.", [], "$18.00"),
    ("It was 5-3 at half time.", [], "3"),
    ("we lose −3 apples", [], "-3"),
    ("between 1/2 and 3 / 4 cups", [], "3 / 4"),
    ("-3, 1, 5", [], "-3, 1, 5"),
    ("yes", [], "yes"),
    ("I do not know how to solve this problem, sorry about that, it is far too hard for me.", [], ""),
    ("", ["Question:"], ""),
])
def test_extract_prediction(text, stop, prediction):
    assert extract_prediction(text, stop) == prediction


def test_prediction_without_answer_never_matches():
    text = "I do not know how to solve this problem, sorry about that, it is far too hard for me."
    assert not answers_match(extract_prediction(text), "18")


@pytest.mark.parametrize("a, b", [
    ("12.50", "12.5"), ("1,000", "1000"), ("1,000,000.0", "1000000"), ("3/4", "0.75"),
    ("$\\frac{3}{4}$", "3/4"), ("\\dfrac34", "0.75"), ("\\dfrac{635}{806}", "$635/806$"), ("-\\frac{1}{2}", "-0.5"),
    ("-5", "-5.0"), ("−5", "-5"), ("+7", "7"), ("$18.00", "18"), ("\\$18", "18"), ("50%", "50"), ("50\\%", "50"),
    ("78.", "78"), (".5", "1/2"), ("1\\!000", "1000"), ("1\\,000", "1000"), ("**42**", "42"), ("\\(42\\)", "42"),
    ("90^\\circ", "90"), ("17 x 37", "17 × 37"), ("2*2*3", "2 \\times 2 \\times 3"), ("1A3", "1a3"),
    ("Yes", "yes."), ("\\text{Evelyn}", "evelyn"), ("\\sqrt{3}", "\\sqrt3"), ("(1, 2)", "(1,2)"),
    ("[-3, 1, 5]", "-3,1,5"), ("\\frac{1}{2}, 3", "3, 0.5"), ("y = 2x + 3", "2x+3"),
])
def test_answers_match(a, b):
    assert answers_match(a, b) and answers_match(b, a)


@pytest.mark.parametrize("prediction, gold", [
    ("12", "12.5"), ("1/2", "2"), ("0.333", "1/3"), ("5", "-5"), ("12", "13"), ("1,2", "12"), ("1/0", "0"),
    ("11/2", "1\\frac{1}{2}"), ("yes", "True"), ("(2, 1)", "(1, 2)"), ("(1, 2)", "[1, 2]"), ("1, 2", "1, 2, 3"),
    ("1, 1, 2", "1, 2, 2"), ("", "0"), ("0", ""), ("", ""), ("anything", "   "),
])
def test_answers_do_not_match(prediction, gold):
    assert not answers_match(prediction, gold)


def test_parse_number_and_normalize_text():
    assert parse_number("$1,234.50") == Fraction(2469, 2)
    assert parse_number("\\frac{-3}{4}") == Fraction(-3, 4)
    assert parse_number("1 1/2") is None and parse_number("1,23") is None and parse_number("abc") is None
    assert normalize_text(" $\\text{X} \\cdot 3$. ") == "x*3"


@pytest.mark.parametrize("prediction, gold, match", [
    ("12.50", "12.5", True),
    ("1,000", "1000", True),
    ("1,000,000.0", "1000000", True),
    ("3/4", "0.75", True),
    ("$\\frac{3}{4}$", "3/4", True),
    ("\\dfrac{635}{806}", "$635/806$", True),
    ("-5", "-5.0", True),
    ("−5", "-5", True),
    ("+7", "7", True),
    ("$12", "12", True),
    ("50%", "50", True),
    ("78.", "78", True),
    (".5", "1/2", True),
    ("0.333", "1/3", False),
    ("5", "-5", False),
    ("12", "13", False),
    ("1,2", "12", False),
    ("1/0", "0", False),
    ("17 x 37", "17 × 37", True),
    ("2*2*3", "2 × 2 × 3", True),
    ("1A3", "1a3", True),
    ("Yes", "yes.", True),
    ("", "0", False),
    ("", "", False),
])
def test_answers_match_table(prediction, gold, match):
    assert answers_match(prediction, gold) is match


def test_ordered_lists_for_sorting_and_reversal_tasks():
    from s2l_ray.answers import answers_match

    gold = "thought, sentence, federal, ambassador, Only"
    shuffled = "Only, ambassador, federal, sentence, thought"
    assert answers_match(shuffled, gold)  # roots of an equation: any order
    assert not answers_match(shuffled, gold, ordered_lists=True)
    assert answers_match("thought,sentence, federal,ambassador, Only", gold, ordered_lists=True)
    gold = "['52.2', '30.0', '14.0', '-49.0', '-81.0']"
    assert answers_match("['52.2', '30.0', '14.0', '-49.0', '-81.0']", gold, ordered_lists=True)
    assert not answers_match("['-81.0', '-49.0', '14.0', '30.0', '52.2']", gold, ordered_lists=True)
