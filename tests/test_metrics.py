"""Tests for eval.metrics: hand-derived cases always; parity with the official scorer
(/tmp/official/get_score.py) on generated strings when that file is present."""

from __future__ import annotations

import ast
import random
import warnings
from pathlib import Path

import pytest

from eval import metrics
from eval.metrics import (
    SCORERS,
    aggregate,
    evaluate_records,
    normalize_answer,
    pope_choice,
    score_aokvqa,
    score_docvqa,
    score_gqa,
    score_pope,
    score_textvqa,
    score_vqav2,
    score_vstar,
    vqa_accuracy,
    vstar_choice,
    vstar_options,
)

# ---------------------------------------------------------------------------------------
# Normalisation: expected outputs derived by hand from the rules.

NORMALISE_CASES = [
    # case and whitespace
    ("Yes", "yes"),
    ("  YES  ", "yes"),
    ("Red\tand\nBlue", "red and blue"),
    ("", ""),
    ("   ", ""),
    ("multiple   spaces here", "multiple spaces here"),
    # number words (only none/zero..ten)
    ("two", "2"),
    ("Two dogs", "2 dogs"),
    ("none", "0"),
    ("zero", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),
    ("twenty one", "twenty 1"),
    ("one-two", "1 2"),
    ("TEN", "10"),
    # articles
    ("a", ""),
    ("A", ""),
    ("the", ""),
    ("An apple", "apple"),
    ("the cat", "cat"),
    ("a dog and the cat", "dog and cat"),
    ("theater", "theater"),
    ("a.", ""),
    ("an-apple", "apple"),
    # contractions
    ("dont", "don't"),
    ("Dont know", "don't know"),
    ("don't", "don't"),
    ("cant", "can't"),
    ("wont", "won't"),
    ("Im", "im"),  # capital-I keys never fire after lower-casing
    ("Ive", "ive"),
    ("twas", "'twas"),
    ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"),
    ("couldntve", "couldntve"),
    ("somebody'd", "somebodyd"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("oclock", "o'clock"),
    ("its", "its"),
    ("whats that", "what's that"),
    # periods
    ("3.5", "3.5"),
    ("3.5.", "3.5"),
    ("end.", "end"),
    ("U.S.A.", "usa"),
    (".5", ".5"),
    ("5.", "5"),
    ("1.2.3", "1.2.3"),
    ("Mr. Smith", "mr smith"),
    ("...", ""),
    # commas and the digit-comma-digit rule
    ("1,000", "1000"),
    ("1, 000", "1 000"),
    ("red,blue", "red blue"),
    ("red, blue", "red blue"),
    ("1,000 cats/dogs", "1000 catsdogs"),
    ("(1,5)", "15"),
    # punctuation deleted when it touches a space anywhere, else spaced out
    ("yes!", "yes"),
    ("yes !", "yes"),
    ("what?", "what"),
    ("red/blue", "red blue"),
    ("red / blue", "red blue"),
    ("red/blue or green/ yellow", "redblue or green yellow"),
    ("t-shirt", "t shirt"),
    ("t-shirt - blue", "tshirt blue"),
    ("(yes)", "yes"),
    ("[a]", ""),
    ('"quoted"', "quoted"),
    ("x=y+z", "x y z"),
    ("snake_case", "snake case"),
    ("back\\slash", "back slash"),
    ("<tag>", "tag"),
    ("user@example", "user example"),
    ("`tick`", "tick"),
    ("{brace}", "brace"),
    ("semi;colon", "semi colon"),
    # kept characters
    ("10:30", "10:30"),
    ("$5", "$5"),
    ("50%", "50%"),
    ("#1", "#1"),
    ("rock & roll", "rock & roll"),
    ("a*b", "a*b"),
    ("o'neil", "o'neil"),
    ("'quoted'", "'quoted'"),
    # unicode
    ("Café", "café"),
    ("ÉCOLE", "école"),
    ("naïve—dash", "naïve—dash"),
    ("東京", "東京"),
    ("٣.٥", "٣.٥"),  # Arabic-Indic digits are digits for \d
    ("١,٠٠٠", "١٠٠٠"),
    ("nbsp\u00a0space", "nbsp space"),
]


@pytest.mark.parametrize("text,expected", NORMALISE_CASES)
def test_normalize_answer_hand_cases(text, expected):
    assert normalize_answer(text) == expected


def test_period_strip_limited_to_32():
    text = "." * 40
    assert normalize_answer(text) == "." * 8


def test_normalize_answer_rejects_non_str():
    with pytest.raises(ValueError, match="text"):
        normalize_answer(None)


# ---------------------------------------------------------------------------------------
# VQA accuracy: official vs standard.


def _loo(matches: int, n: int) -> float:
    """Leave-one-out standard VQA accuracy computed from scratch."""
    accs = [min(1.0, (matches - (i < matches)) / 3) for i in range(n)]
    return 100 * sum(accs) / n


@pytest.mark.parametrize("matches", range(11))
def test_official_vs_standard_ten_answers(matches):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    official = vqa_accuracy("cat", answers)
    standard = vqa_accuracy("cat", answers, variant="standard")
    assert official == 100 * min(0.3 * matches, 1)
    # With ten answers the two metrics agree (up to float rounding).
    assert standard == pytest.approx(official, abs=1e-9)
    assert standard == pytest.approx(_loo(matches, 10))


def test_two_of_ten_hand_computed():
    answers = ["2", "two"] + ["3"] * 8
    assert vqa_accuracy("Two", answers) == pytest.approx(60.0)
    # 2 subsets drop a match -> 1/3 each; 8 keep both -> 2/3 each; mean = 0.6.
    assert vqa_accuracy("Two", answers, "standard") == pytest.approx(
        100 * (2 * (1 / 3) + 8 * (2 / 3)) / 10
    )


def test_official_float_quirk_three_matches():
    assert vqa_accuracy("a", ["a", "a", "a", "b"]) == 100 * (0.3 * 3)
    assert vqa_accuracy("a", ["a", "a", "a", "b"]) == 89.99999999999999


@pytest.mark.parametrize(
    "matches,n,expected",
    [
        (1, 5, 100 * (4 * (1 / 3)) / 5),  # official would give 30
        (2, 5, 100 * (2 * (1 / 3) + 3 * (2 / 3)) / 5),
        (3, 3, 100 * (2 / 3)),
        (4, 4, 100.0),
        (0, 2, 0.0),
    ],
)
def test_standard_differs_for_other_counts(matches, n, expected):
    answers = ["x"] * matches + ["y"] * (n - matches)
    assert vqa_accuracy("x", answers, "standard") == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    answers = ["The Dog!", "dog", "a dog.", "cat"] + ["x"] * 6
    assert vqa_accuracy("DOG", answers) == pytest.approx(90.0)
    assert vqa_accuracy("1,000", ["1000"] * 10) == 100.0
    assert vqa_accuracy("dont know", ["don't know"] * 10) == 100.0


def test_vqa_accuracy_errors():
    with pytest.raises(ValueError, match="bogus"):
        vqa_accuracy("x", ["x"], variant="bogus")
    with pytest.raises(ValueError, match="answers"):
        vqa_accuracy("x", [])
    with pytest.raises(ValueError, match="answers"):
        vqa_accuracy("x", "x")
    with pytest.raises(ValueError, match=r"answers\[1\]"):
        vqa_accuracy("x", ["x", None])
    with pytest.raises(ValueError, match="prediction"):
        vqa_accuracy(3, ["3"])
    with pytest.raises(ValueError, match="answers"):
        vqa_accuracy("x", ["x"], "standard")


# ---------------------------------------------------------------------------------------
# Task scorers.


def test_textvqa_vqav2_aokvqa_same_rule():
    answers = ["stop", "stop", "STOP", "Stop!"] + ["go"] * 6
    for fn in (score_textvqa, score_vqav2, score_aokvqa):
        assert fn("stop", answers) == 100.0
        assert fn("go", answers) == 100.0
        assert fn("wait", answers) == 0.0
        assert fn("stop", ["stop"] + ["x"] * 9) == pytest.approx(30.0)
        assert fn("stop", ["stop"] + ["x"] * 9, variant="standard") == pytest.approx(30.0)


def test_gqa_substring_quirks():
    assert score_gqa("Yes", ["yes"]) == 100
    assert score_gqa("The answer is yes.", ["yes"]) == 100
    assert score_gqa("not sure", ["no"]) == 100  # character substring, not a word
    assert score_gqa("eyes", ["yes"]) == 100
    assert score_gqa("left", ["right"]) == 0
    assert score_gqa("anything", ["a"]) == 100  # "a" normalises to ""
    assert score_gqa("two", ["2"]) == 100
    assert score_gqa("red and blue", ["red", "blue"]) == 200  # can exceed 100
    with pytest.raises(ValueError, match="answers"):
        score_gqa("yes", "yes")


@pytest.mark.parametrize(
    "pred,choice",
    [
        ("yes", "yes"),
        ("Yes", "yes"),
        ("Yes, there is.", "yes"),
        ("no", "no"),
        ("No", "no"),
        ("NO", "yes"),  # no shared character with either -> tie -> first (yes)
        ("", "yes"),
        ("nope", "no"),
        ("There is no dog", "no"),
    ],
)
def test_pope_choice(pred, choice):
    assert pope_choice(pred) == choice
    assert score_pope(pred, choice) == 100.0
    assert score_pope(pred, "no" if choice == "yes" else "yes") == 0.0


def test_pope_errors():
    with pytest.raises(ValueError, match="label"):
        score_pope("yes", "Yes")
    with pytest.raises(ValueError, match="label"):
        score_pope("yes", ["yes"])


VSTAR_Q = (
    "What is the color of the umbrella?\n(A) red\n(B) blue\n(C) green\n(D) white\n"
    "Answer with the option's letter from the given choices directly."
)


def test_vstar():
    assert vstar_options(VSTAR_Q) == ["(A) red", "(B) blue", "(C) green", "(D) white"]
    assert vstar_choice("B", VSTAR_Q) == "B"
    assert vstar_choice("(C) green", VSTAR_Q) == "C"
    assert vstar_choice("white", VSTAR_Q) == "D"
    # One correct label gives 30 under the official 0.3-per-match rule.
    assert score_vstar("B", VSTAR_Q, "B") == pytest.approx(30.0)
    assert score_vstar("B", VSTAR_Q, ["B"] * 10) == 100.0
    assert score_vstar("A", VSTAR_Q, "A") == pytest.approx(30.0)  # "a" -> "" both sides
    assert score_vstar("B", VSTAR_Q, "A") == 0.0
    two = "Is the cup left or right of the plate?\n(A) left\n(B) right\nAnswer."
    assert vstar_choice("right", two) == "B"
    with pytest.raises(ValueError, match="question"):
        vstar_options("no options\nhere")
    with pytest.raises(ValueError, match="labels"):
        score_vstar("A", VSTAR_Q, "AB")


def test_docvqa_raw_substring():
    assert score_docvqa("$1,000", ["$1,000"]) == 100.0
    assert score_docvqa("1,000", ["$1,000.00"]) == 100.0  # prediction inside answer
    assert score_docvqa("Total: 1,000", ["1,000"]) == 100.0  # answer inside prediction
    assert score_docvqa("total", ["Total"]) == 0.0  # case-sensitive
    assert score_docvqa("", ["anything"]) == 100.0  # empty prediction always matches
    assert score_docvqa("two", ["2"]) == 0.0  # no normalisation
    assert score_docvqa("b", ["a", "abc"]) == 100.0
    with pytest.raises(ValueError, match="answers"):
        score_docvqa("x", [])


def test_scorers_dict_and_aggregate():
    assert set(SCORERS) == {
        "textvqa", "vqav2", "aokvqa", "gqa", "pope", "vstar", "docvqa", "synthetic"
    }  # fmt: skip
    rec = {"labels": ["cat"] * 10, "question": "q"}
    assert SCORERS["textvqa"]("cat", rec) == 100.0
    # The synthetic benchmark: ten copies of one answer, so exact match after normalising.
    assert SCORERS["synthetic"]("K", {"labels": ["k"] * 10}) == 100.0
    assert SCORERS["synthetic"]("x", {"labels": ["k"] * 10}) == 0.0
    assert SCORERS["pope"]("yes", {"labels": "yes"}) == 100.0
    assert SCORERS["vstar"]("B", {"question": VSTAR_Q, "labels": "B"}) == pytest.approx(30.0)
    with pytest.raises(ValueError, match="labels"):
        SCORERS["gqa"]("x", {"question": "q"})
    assert aggregate([100.0, 0.0, 30.0]) == pytest.approx(130 / 3)
    with pytest.raises(ValueError, match="scores"):
        aggregate([])
    records = [
        {"labels": "yes", "original_answer": "yes", "crop_answer": "no"},
        {"labels": "no", "original_answer": "yes", "crop_answer": "no"},
    ]
    assert evaluate_records("pope", records) == {"original_answer": 50.0, "crop_answer": 50.0}
    with pytest.raises(ValueError, match="task"):
        evaluate_records("chartqa", records)
    with pytest.raises(ValueError, match="crop_answer"):
        evaluate_records("pope", [{"labels": "yes", "original_answer": "yes"}])


# ---------------------------------------------------------------------------------------
# Parity with the official scorer, when its source is available (never in CI).

OFFICIAL = Path("/tmp/official/get_score.py")
_KEEP_ASSIGN = {"contractions", "manualMap", "articles", "periodStrip", "commaStrip", "punct"}


def _load_official() -> dict:
    """Exec only the official scorer's tables and functions (it imports pandas at top)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its regex literals use invalid escapes
        tree = ast.parse(OFFICIAL.read_text())
    keep = []
    for node in tree.body:
        if isinstance(node, ast.Import) and all(a.name in ("re", "difflib") for a in node.names):
            keep.append(node)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in _KEEP_ASSIGN for t in node.targets
        ):
            keep.append(node)
        elif isinstance(node, ast.FunctionDef) and node.name != "main":
            keep.append(node)
    ns: dict = {"tqdm": lambda x: x}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(OFFICIAL), "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def official():
    if not OFFICIAL.exists():
        pytest.skip("official scorer not available at /tmp/official/get_score.py")
    return _load_official()


_WORDS = (
    "yes no Yes NO cat dog red blue green a an the A The An one two three ten none zero "
    "eleven dont cant wont Im Ive twas yall yall'll couldnt've couldn'tve somebody'd "
    "don't it's its whats thats oclock 3.5 1,000 1,000,000 .5 5. 10:30 $5 50% "
    "U.S.A. Mr. t-shirt red/blue café ÉCOLE 東京 ٣.٥ ١,٠٠٠ ß İstanbul naïve"
).split()
_MARKS = list(";/[]\"{}()=+\\_-><@`,?!.:'#&*|~^") + [" ", "  ", "\t", "\n", "\u00a0"]


def _random_string(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 6)):
        r = rng.random()
        if r < 0.5:
            parts.append(rng.choice(_WORDS))
        elif r < 0.8:
            parts.append(rng.choice(_MARKS))
        elif r < 0.9:
            parts.append(str(rng.randint(0, 20000)))
        else:
            parts.append(rng.choice(_WORDS).upper())
        parts.append(rng.choice([" ", " ", " ", "", "\t"]))
    return "".join(parts)


def _generated(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    fixed = [t for t, _ in NORMALISE_CASES] + ["." * 40, "a." * 40, "1,2" + "!" * 5]
    return fixed + [_random_string(rng) for _ in range(n)]


def test_parity_normalisation(official):
    strings = _generated(3000, seed=0)
    mismatched = [s for s in strings if normalize_answer(s) != official["process_text"](s)]
    print(f"normalisation parity: {len(strings) - len(mismatched)}/{len(strings)} matched")
    assert not mismatched


def test_parity_contraction_table(official):
    # Keys with upper-case letters are unreachable after lower-casing; identities are no-ops.
    reachable = {k: v for k, v in official["contractions"].items() if k == k.lower() and k != v}
    assert metrics._CONTRACTIONS == reachable
    assert set(metrics._PUNCT_MARKS) == set(official["punct"])
    assert metrics._NUMBER_WORDS == {k: v for k, v in official["manualMap"].items() if k != v}


def _records(task: str, rng: random.Random, n: int) -> list[dict]:
    out = []
    pool = [_random_string(rng) for _ in range(40)] + ["yes", "no", "2", "two", "the dog"]
    for _ in range(n):
        if task == "pope":
            labels = rng.choice(["yes", "no"])
            preds = [rng.choice(pool + ["Yes", "No", "NO", "nope", ""]) for _ in range(2)]
            question = ""
        elif task == "vstar":
            k = rng.choice([2, 4])
            opts = [f"({'ABCD'[i]}) {rng.choice(_WORDS)}" for i in range(k)]
            question = "Q?\n" + "\n".join(opts) + "\nAnswer with the letter."
            labels = rng.choice([rng.choice("ABCD"[:k]), [rng.choice("ABCD"[:k])] * 10])
            preds = [rng.choice(list("ABCD") + opts + pool) for _ in range(2)]
        else:
            base = rng.choice(pool)
            labels = [rng.choice([base, rng.choice(pool)]) for _ in range(rng.choice([1, 3, 10]))]
            preds = [rng.choice([base, rng.choice(pool), base.upper() + "."]) for _ in range(2)]
            question = ""
        out.append(
            {
                "question": question,
                "labels": labels,
                "original_answer": preds[0],
                "crop_answer": preds[1],
            }
        )
    return out


@pytest.mark.parametrize("task", ["textvqa", "vqav2", "aokvqa", "gqa", "pope", "vstar", "docvqa"])
def test_parity_task_scores(official, task):
    rng = random.Random(sum(map(ord, task)))
    records = _records(task, rng, 400)
    raw, crop = official[f"evaluate_{task}"](records)
    ours = evaluate_records(task, records)
    # Exact equality: same per-question floats, summed in the same order.
    assert ours == {"original_answer": raw, "crop_answer": crop}
    # And per question.
    for r in records:
        o_raw, o_crop = official[f"evaluate_{task}"]([r])
        assert SCORERS[task](r["original_answer"], r) == o_raw
        assert SCORERS[task](r["crop_answer"], r) == o_crop
