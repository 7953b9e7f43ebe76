"""Per-question scorers that reproduce the official ViCrop scoring (`get_score.py`).

Every scorer takes a model prediction (a string, as `run.py` stores it under
`original_answer` / `crop_answer`) and the record's ground truth (`labels`, plus the
`question` text for V*), and returns a per-question score in percent. `aggregate` turns a
list of such scores into the benchmark number exactly as the official script does (a plain
mean in list order).

Reported variant. TextVQA, VQAv2 and A-OKVQA are scored by default with the official
code's rule, `100 * min(0.3 * matches, 1)` after the VQA answer normalisation, because that
is what produced the paper's tables. `variant="standard"` gives the VQA evaluation's metric
instead: the mean over the leave-one-out subsets of `min(1, matches / 3)`, times 100. With
ten human answers the two agree up to float rounding; they differ for other answer counts.

Normalisation (`normalize_answer`) follows the official code, quirks included:
  * punctuation from a fixed set is deleted when it touches a space somewhere in the
    original string, or when the string holds a digit-comma-digit anywhere (then *every*
    listed mark is deleted, so "1,000 cats/dogs" -> "1000 catsdogs"); otherwise it becomes
    a space. Apostrophes, colons, `$`, `%`, `#`, `&`, `*`, `|`, `~`, `^` are kept;
  * a period not followed by a digit is deleted ("3.5" keeps its point, "end." loses it),
    but at most 32 of them: the official call passes `re.UNICODE` (32) where `count` goes;
  * lower-case, split on whitespace, map the number words none/zero..ten to digits, drop
    the articles a/an/the, and restore the apostrophe in common contractions
    ("dont" -> "don't"). Contraction keys spelt with a capital I ("Im", "Ive") can never
    fire after lower-casing, so they are left out here; "somebody'd" maps *to* "somebodyd",
    a reversal kept from the VQA toolkit.

Task rules (see each scorer): GQA counts a normalised label as correct when it is a
character substring of the normalised prediction; POPE and V* pick the nearest candidate
by `difflib` similarity of the raw strings; DocVQA is a raw, case-sensitive substring test
in either direction.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "SCORERS",
    "VARIANTS",
    "aggregate",
    "evaluate_records",
    "normalize_answer",
    "pope_choice",
    "score_aokvqa",
    "score_docvqa",
    "score_gqa",
    "score_pope",
    "score_textvqa",
    "score_vqav2",
    "score_vstar",
    "vqa_accuracy",
    "vstar_choice",
    "vstar_options",
]

VARIANTS = ("official", "standard")

# ---------------------------------------------------------------------------------------
# Normalisation tables (the VQA evaluation's rules, as used by the official scorer).

# Marks that are deleted or turned into a space. The period is handled separately.
_PUNCT_MARKS = '!"()+,-/;<=>?@[\\]_`{}'  # ASCII order; each mark is handled independently
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# `\d` is Unicode-aware for str patterns, as in the official expressions.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_STRIPPED = 32  # re.UNICODE == 32, passed positionally as `count` upstream.

_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions with one apostrophe: the spelling without it is restored.
_ONE_APOSTROPHE = """
    ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd
    he's how'd how'll how's isn't it'd it'll ma'am mightn't might've mustn't must've
    needn't not've o'clock oughtn't shan't should've shouldn't somebody'll somebody's
    someone'd someone'll someone's something'd something'll that's there'd there're
    there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're
    what's what've when's where'd where's where've who'd who'll who's who've why'll why're
    why's won't would've wouldn't y'all you'd you'll you're you've
""".split()
# Contractions with several apostrophes: a spelling missing exactly one is restored.
_MANY_APOSTROPHES = """
    couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've somebody'd've
    someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've you'd've
    y'all'll y'all'd've 'ow's'at
""".split()


def _build_contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for full in _ONE_APOSTROPHE:
        table[full.replace("'", "")] = full
    for full in _MANY_APOSTROPHES:
        cuts = [i for i, ch in enumerate(full) if ch == "'"]
        for i in cuts:
            table[full[:i] + full[i + 1 :]] = full
    # Kept from the VQA toolkit, which maps this one the wrong way round.
    table["somebody'd"] = "somebodyd"
    return table


_CONTRACTIONS = _build_contractions()


def _strip_punctuation(text: str) -> str:
    """Delete or space out punctuation; decisions look at the *original* text."""
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCT_MARKS:
        touches_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if (touches_space or has_digit_comma) else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_STRIPPED)


def _normalise_words(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The official answer normalisation (VQA evaluation rules, quirks kept).

    Args:
      text: a prediction or a ground-truth answer.

    Returns:
      The normalised string: punctuation handled, lower-cased, number words as digits,
      articles dropped, contractions restored, words joined by single spaces.
    """
    _check_str(text, "text")
    return _normalise_words(_strip_punctuation(text))


# ---------------------------------------------------------------------------------------
# Input checks.


def _check_str(value: Any, name: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")


def _check_answers(answers: Any, name: str = "answers") -> list[str]:
    # A bare string would be iterated character by character by the official code.
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise ValueError(
            f"{name} must be a non-empty list of strings, got {type(answers).__name__}"
        )
    if len(answers) == 0:
        raise ValueError(f"{name} is empty; at least one ground-truth answer is needed")
    for i, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise ValueError(f"{name}[{i}] must be a str, got {type(answer).__name__}")
    return list(answers)


# ---------------------------------------------------------------------------------------
# VQA accuracy (TextVQA, VQAv2, A-OKVQA direct answer).


def vqa_accuracy(prediction: str, answers: Sequence[str], variant: str = "official") -> float:
    """VQA-style accuracy of one prediction against the human answers, in percent.

    Args:
      prediction: the model's answer.
      answers: the human answers (ten for TextVQA / VQAv2 / A-OKVQA).
      variant: "official" -> 100 * min(0.3 * matches, 1), as the ViCrop scorer computes it
        (same float arithmetic, so 3 matches give 89.99999999999999); "standard" -> the
        VQA evaluation's mean over the leave-one-out subsets of min(1, matches / 3), times
        100. Both normalise the prediction and every answer with `normalize_answer`. (The
        VQA toolkit skips normalisation when all answers are identical; that shortcut is
        not reproduced.)

    Returns:
      The score in percent, in [0, 100].
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    _check_str(prediction, "prediction")
    answers = _check_answers(answers)
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    matches = sum(hits)
    if variant == "official":
        return 100 * min(0.3 * matches, 1)
    if len(answers) < 2:
        raise ValueError(
            "answers needs at least 2 entries for the leave-one-out 'standard' variant"
        )
    per_subset = [min(1.0, (matches - hit) / 3) for hit in hits]
    return 100 * sum(per_subset) / len(per_subset)


def score_textvqa(prediction: str, answers: Sequence[str], variant: str = "official") -> float:
    """TextVQA: `vqa_accuracy` against the ten human answers (record field `labels`)."""
    return vqa_accuracy(prediction, answers, variant)


def score_vqav2(prediction: str, answers: Sequence[str], variant: str = "official") -> float:
    """VQAv2: `vqa_accuracy` against the ten human answers (record field `labels`)."""
    return vqa_accuracy(prediction, answers, variant)


def score_aokvqa(prediction: str, answers: Sequence[str], variant: str = "official") -> float:
    """A-OKVQA direct answer: `vqa_accuracy` against the ten direct answers.

    The official code scores A-OKVQA only in the direct-answer setting; it has no
    multiple-choice scorer, so none is offered here.
    """
    return vqa_accuracy(prediction, answers, variant)


# ---------------------------------------------------------------------------------------
# GQA, DocVQA.


def score_gqa(prediction: str, answers: Sequence[str]) -> float:
    """GQA: 100 for every normalised label that is a substring of the normalised prediction.

    Mirrors the official rule exactly: a character substring, not a word match ("no" is
    found in "not sure", "yes" in "eyes"), a label that normalises to "" (e.g. "a") always
    counts, and with several labels the score is 100 * (labels contained), so it can pass
    100.
    """
    _check_str(prediction, "prediction")
    answers = _check_answers(answers)
    pred = normalize_answer(prediction)
    return 100 * sum(normalize_answer(a) in pred for a in answers)


def score_docvqa(prediction: str, answers: Sequence[str]) -> float:
    """DocVQA: 100 if the raw prediction and some raw answer contain one another, else 0.

    No normalisation and no lower-casing, as in the official code: the test is
    case-sensitive, surrounding spaces count, and an empty prediction always scores 100.
    """
    _check_str(prediction, "prediction")
    answers = _check_answers(answers)
    hit = any(prediction in a or a in prediction for a in answers)
    return 100.0 if hit else 0.0


# ---------------------------------------------------------------------------------------
# Nearest-candidate tasks: POPE, V*.


def _nearest(prediction: str, candidates: Sequence[str]) -> int:
    """Index of the candidate most similar to the prediction; the first one wins ties."""
    # Argument order (prediction first) matters: SequenceMatcher.ratio is not symmetric.
    sims = [difflib.SequenceMatcher(None, prediction, c).ratio() for c in candidates]
    return sims.index(max(sims))


_POPE_CHOICES = ("yes", "no")


def pope_choice(prediction: str) -> str:
    """'yes' or 'no', whichever the raw prediction is more similar to ('yes' on a tie)."""
    _check_str(prediction, "prediction")
    return _POPE_CHOICES[_nearest(prediction, _POPE_CHOICES)]


def score_pope(prediction: str, label: str) -> float:
    """POPE: 100 if the nearer of yes/no (raw `difflib` ratio) equals the label, else 0.

    The prediction is not lower-cased, so "NO" shares no character with either choice,
    ties, and is read as "yes"; an empty prediction is read as "yes" too.
    """
    _check_str(label, "label")
    if label not in _POPE_CHOICES:
        raise ValueError(f"label must be 'yes' or 'no', got {label!r}")
    return 100.0 if pope_choice(prediction) == label else 0.0


_VSTAR_LETTERS = "ABCD"


def vstar_options(question: str) -> list[str]:
    """The option lines of a V* question: every line but the first and the last.

    V* questions read "<question>\\n(A) ...\\n(B) ...[\\n(C) ...\\n(D) ...]\\n<instruction>".
    """
    _check_str(question, "question")
    options = question.split("\n")[1:-1]
    if not 1 <= len(options) <= len(_VSTAR_LETTERS):
        raise ValueError(
            f"question must hold 1 to {len(_VSTAR_LETTERS)} option lines between its first "
            f"and last lines, found {len(options)}"
        )
    return options


def vstar_choice(prediction: str, question: str) -> str:
    """The letter of the option line whose raw text is most similar to the prediction."""
    _check_str(prediction, "prediction")
    return _VSTAR_LETTERS[_nearest(prediction, vstar_options(question))]


def score_vstar(prediction: str, question: str, labels: str | Sequence[str]) -> float:
    """V*: map the prediction to an option letter, then score it like VQA (official rule).

    The letter comes from `vstar_choice` (similarity to the whole option line, e.g.
    "(A) red", not to the letter), then `vqa_accuracy(letter, labels)`. Consequently a
    single correct label scores 30, not 100 (0.3 per match); the official data must carry
    the letter several times for 100. A single-letter string label is accepted (the official
    code iterates over it, which for one character is the same as a one-item list).
    """
    if isinstance(labels, str):
        if len(labels) != 1:
            raise ValueError(f"labels must be one option letter or a list, got {labels!r}")
        labels = [labels]
    return vqa_accuracy(vstar_choice(prediction, question), labels, "official")


# ---------------------------------------------------------------------------------------
# Records and aggregation.


def _field(record: Mapping[str, Any], key: str) -> Any:
    if not isinstance(record, Mapping):
        raise ValueError(f"record must be a mapping, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"record has no {key!r} field (fields: {sorted(record)})")
    return record[key]


def _answers_scorer(fn: Callable[..., float]) -> Callable[[str, Mapping[str, Any]], float]:
    def score(prediction: str, record: Mapping[str, Any]) -> float:
        return fn(prediction, _field(record, "labels"))

    score.__name__ = fn.__name__ + "_record"
    score.__doc__ = f"`{fn.__name__}` on a run.py record (uses its `labels`)."
    return score


def _vstar_record(prediction: str, record: Mapping[str, Any]) -> float:
    """`score_vstar` on a run.py record (uses its `question` and `labels`)."""
    return score_vstar(prediction, _field(record, "question"), _field(record, "labels"))


# Task name (as in the official file names) -> scorer(prediction, record) -> percent.
SCORERS: dict[str, Callable[[str, Mapping[str, Any]], float]] = {
    "textvqa": _answers_scorer(score_textvqa),
    "synthetic": _answers_scorer(score_textvqa),  # ten copies of the answer: exact match
    "vqav2": _answers_scorer(score_vqav2),
    "aokvqa": _answers_scorer(score_aokvqa),
    "gqa": _answers_scorer(score_gqa),
    "pope": _answers_scorer(score_pope),
    "vstar": _vstar_record,
    "docvqa": _answers_scorer(score_docvqa),
}


def aggregate(scores: Sequence[float]) -> float:
    """Benchmark number from per-question scores: their plain mean, in list order.

    Summed left to right like the official script, so results match it bit for bit.
    """
    if isinstance(scores, str) or not isinstance(scores, Sequence):
        raise ValueError(f"scores must be a sequence of numbers, got {type(scores).__name__}")
    if len(scores) == 0:
        raise ValueError("scores is empty; nothing to aggregate")
    return sum(scores) / len(scores)


def evaluate_records(
    task: str,
    records: Sequence[Mapping[str, Any]],
    fields: Sequence[str] = ("original_answer", "crop_answer"),
) -> dict[str, float]:
    """Score run.py output records of one task, as the official `evaluate_<task>` does.

    Args:
      task: a key of `SCORERS`.
      records: dicts with the ground truth (`labels`, and `question` for V*) and the
        prediction fields.
      fields: which prediction fields to score.

    Returns:
      {field: aggregate score in percent} for each field.
    """
    if task not in SCORERS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(SCORERS)}")
    scorer = SCORERS[task]
    return {f: aggregate([scorer(_field(r, f), r) for r in records]) for f in fields}
