"""Verifiable rewards for math answers (the "R" in RLVR).

Two graders, both mapping ``(response, ground_truth) -> float``:

``"dapo"`` -- :func:`score_dapo`
    The DAPO convention (Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale", arXiv:2503.14476): only the last 300 characters of the response are graded; the answer
    is the text after the last ``Answer:`` line there (falling back to the last ``\\boxed{...}``),
    and it is correct iff it equals the ground truth after :func:`normalize_answer`. Pure string
    matching: fast and deterministic, but ``0.5`` and ``\\frac{1}{2}`` differ.

``"math"`` -- :func:`score_math`
    Symbolic equivalence with Hugging Face's Math-Verify (PyPI ``math-verify``,
    https://github.com/huggingface/Math-Verify): ``verify(parse(gold), parse(pred))``. Accepts
    both ``\\boxed{}`` answers and ``Answer:`` lines. Math-Verify's own timeouts use
    ``signal.alarm`` and only work in the main thread; here they are disabled and replaced by a
    thread-based timeout that works from any thread (see :func:`score_math`).

Reward conventions (``convention=``):

``"pm1"`` -- correct ``1.0``, incorrect ``-1.0`` (the DAPO paper's rule-based reward).
``"01"``  -- correct ``1.0``, incorrect ``0.0``.

A response with no extractable answer, a parse failure, an exception inside Math-Verify or a
timeout all count as *incorrect* (the negative value of the convention); graders never raise on
model output. Library code never prints.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

__all__ = [
    "CONVENTIONS",
    "DAPO_TAIL_CHARS",
    "MATH_TIMEOUT_S",
    "REWARDS",
    "extract_answer_dapo",
    "get_reward_fn",
    "normalize_answer",
    "overlong_penalty",
    "score_batch",
    "score_dapo",
    "score_math",
]

#: ``convention -> (reward if correct, reward if incorrect)``.
CONVENTIONS: dict[str, tuple[float, float]] = {"pm1": (1.0, -1.0), "01": (1.0, 0.0)}

#: DAPO grades only this many trailing characters of a response (arXiv:2503.14476).
DAPO_TAIL_CHARS = 300

#: Default wall-clock budget (seconds) for one Math-Verify check (both parses and the verify).
MATH_TIMEOUT_S = 5.0


def _reward_values(convention: str) -> tuple[float, float]:
    try:
        return CONVENTIONS[convention]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown reward convention {convention!r}; valid: {', '.join(repr(c) for c in CONVENTIONS)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_ANSWER_RE = re.compile(r"answer\s*:", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _matching_brace(s: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_idx`` (backslash-escaped braces skipped)."""
    depth = 0
    i = open_idx
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2  # skip the escaped character (``\{``, ``\}``, ``\\``)
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _last_boxed(s: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``s``; nested braces ok."""
    for m in reversed(list(_BOXED_RE.finditer(s))):
        close = _matching_brace(s, m.end() - 1)
        if close is not None:
            return s[m.end() : close].strip()
    return None


def _unwrap_boxed(s: str) -> str:
    """``\\boxed{X}`` -> ``X`` when the whole string is one boxed expression; else unchanged."""
    m = _BOXED_RE.match(s)
    if m:
        close = _matching_brace(s, m.end() - 1)
        if close == len(s) - 1:
            return s[m.end() : close].strip()
    return s


def _clean_answer_text(s: str) -> str:
    """Strip whitespace, ``$``, markdown bold ``*`` and trailing periods (repeatedly: ``$x$.`` -> ``x``)."""
    prev = None
    while prev != s:
        prev = s
        s = s.strip().strip("$*").rstrip(".")
    return s


def extract_answer_dapo(text: str) -> str | None:
    """Extract the final answer following the DAPO convention (arXiv:2503.14476).

    Only the last :data:`DAPO_TAIL_CHARS` (300) characters of ``text`` are considered:

    1. the last line containing ``Answer:`` (case-insensitive) wins; its answer is the text after
       the last ``Answer:`` on that line, with whitespace, ``$``, markdown ``**`` and trailing
       ``.`` stripped (and a ``\\boxed{...}`` wrapper removed). Lines whose answer is empty are skipped;
    2. otherwise the content of the last complete ``\\boxed{...}`` (nested braces handled, e.g.
       ``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``);
    3. otherwise ``None``.
    """
    if not isinstance(text, str) or not text:
        return None
    tail = text[-DAPO_TAIL_CHARS:]
    return _answer_line(tail) or _last_boxed(tail) or None


def _answer_line(tail: str) -> str | None:
    """Cleaned answer of the last non-empty ``Answer:`` line in ``tail``, else ``None``."""
    for line in reversed(tail.splitlines()):
        matches = list(_ANSWER_RE.finditer(line))
        if not matches:
            continue
        ans = _clean_answer_text(_unwrap_boxed(_clean_answer_text(line[matches[-1].end() :])))
        if ans:
            return ans
    return None


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_LATEX_SPACE_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])")
_DEGREE_PCT_RE = re.compile(r"(?:\^\s*\{?\s*\\circ\s*\}?|°|\\%|%)\s*$")
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
#: Unit words dropped after a plain number (singular or plural, optionally "square"/"cubic").
_UNITS = (
    "mm|cm|m|km|in|inch|inches|ft|foot|feet|yd|yard|mi|mile|meter|metre|centimeter|kilometer|"
    "mg|g|kg|gram|kilogram|lb|pound|oz|ounce|l|ml|liter|litre|s|sec|second|min|minute|h|hr|hour|"
    "day|week|month|year|dollar|cent|unit|degree|radian|mph|km/h|people|person"
)
_NUM_UNIT_RE = re.compile(
    rf"^({_NUM})\s+(?:square\s+|cubic\s+|sq\s+)?(?:{_UNITS})(?:e?s)?(?:\^\{{?[23]\}}?)?$", re.IGNORECASE
)
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?$")
_DECIMAL_RE = re.compile(rf"^{_NUM}$")


def _canonical_number(s: str) -> str:
    """Plain decimal -> canonical string: ``+18.00`` -> ``18``, ``.50`` -> ``0.5``, ``-0.0`` -> ``0``."""
    sign = ""
    if s[0] in "+-":
        sign, s = ("-" if s[0] == "-" else ""), s[1:]
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    s = s.lstrip("0") or "0"
    if s.startswith("."):
        s = "0" + s
    return s if s == "0" else sign + s


def normalize_answer(s: str) -> str:
    """Normalised string form of an answer, used for exact-match grading (``score_dapo``).

    Steps, in order (deliberately simple; symbolic equivalence is ``score_math``'s job):

    * strip surrounding whitespace, every ``$``, a whole-string ``\\boxed{...}`` wrapper;
    * ``\\text{X}`` / ``\\textbf`` / ``\\textrm`` / ``\\mathrm`` / ``\\mbox`` wrappers -> ``X``;
    * drop ``\\left`` / ``\\right``; ``\\dfrac`` / ``\\tfrac`` -> ``\\frac``; drop LaTeX spacing
      (``\\,``, ``\\;``, ``\\!``, ``\\quad``...);
    * units-free simple forms: a trailing degree sign (``^\\circ``, ``°``) or percent sign is
      dropped, and a plain number followed by one common unit word (``18 cm``,
      ``5 \\text{meters}``, ``12 square feet``; see ``_UNITS``) keeps only the number;
    * remove all remaining whitespace and trailing periods;
    * plain numbers: thousands separators removed (``1,000`` -> ``1000``), trailing decimal zeros
      and a leading ``+`` dropped (``18.00`` -> ``18``, ``.5`` -> ``0.5``).

    Non-numeric strings otherwise compare as written (``x^2+1`` != ``1+x^2``).
    """
    if not isinstance(s, str):
        s = str(s)
    s = s.strip().replace("$", "").strip()
    s = _unwrap_boxed(s)
    prev = None
    while prev != s:  # nested \text{\textbf{..}} unwrap from the inside out
        prev = s
        s = _TEXT_WRAP_RE.sub(r" \1", s)  # the space keeps "5\text{cm}" a number + unit
    s = _LEFT_RIGHT_RE.sub("", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = _LATEX_SPACE_RE.sub(" ", s)
    s = s.strip().rstrip(".").strip()
    s = _DEGREE_PCT_RE.sub("", s).strip()
    m = _NUM_UNIT_RE.match(s)
    if m:
        s = m.group(1)
    s = re.sub(r"\s+", "", s).rstrip(".")
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    if _DECIMAL_RE.match(s):
        s = _canonical_number(s)
    return s


# --------------------------------------------------------------------------------------------
# Graders
# --------------------------------------------------------------------------------------------


def score_dapo(response: str, ground_truth: str, convention: str = "pm1") -> float:
    """DAPO rule-based reward (arXiv:2503.14476): exact match after :func:`normalize_answer`.

    The answer is :func:`extract_answer_dapo` (last 300 chars, ``Answer:`` line, else last
    ``\\boxed{}``). Returns ``1.0`` if it matches the normalised ground truth, else ``-1.0``
    (``convention="pm1"``) or ``0.0`` (``convention="01"``); no answer counts as incorrect.
    """
    pos, neg = _reward_values(convention)
    pred = extract_answer_dapo(response)
    if pred is None:
        return neg
    target = normalize_answer(ground_truth)
    return pos if target != "" and normalize_answer(pred) == target else neg


class _DropTimeoutDisabledWarning(logging.Filter):
    """Math-Verify warns once that its timeout is disabled; we provide our own, so drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def _mv_parse(text: str) -> list:
    """``math_verify.parse`` without its signal-based timeout (safe off the main thread)."""
    from math_verify import parse

    return parse(text, parsing_timeout=None)


def _mv_verify(gold: list, pred: list) -> bool:
    """``math_verify.verify(gold, pred)`` -- gold first -- without its signal-based timeout."""
    from math_verify import verify

    return bool(verify(gold, pred, timeout_seconds=None))


def _parse_answer(text: str) -> list:
    """Parse a bare answer (a ground truth, an ``Answer:`` line) as one whole expression.

    Bare LaTeX is wrapped as ``\\boxed{text}`` first: Math-Verify's anchor-free extraction would
    otherwise read ``1+x^2`` as ``1`` and miss ``x^2+1`` entirely. Text that already carries ``$``
    or ``\\boxed`` is parsed as is; an empty result is retried unwrapped.
    """
    if "$" not in text and "\\boxed" not in text:
        parsed = _mv_parse(f"\\boxed{{{text}}}")
        if parsed:
            return parsed
    return _mv_parse(text)


def _math_equal(response: str, ground_truth: str) -> bool:
    """The whole Math-Verify check; runs in a worker thread (see :func:`score_math`)."""
    gold = _parse_answer(str(ground_truth).strip())
    if not gold:
        return False
    pred: list = []
    line = _answer_line(response[-DAPO_TAIL_CHARS:])
    if line:
        # The declared final answer. Math-Verify on the whole text can miss it or grab a stray
        # number instead ("... 3 and 4.\nAnswer: x^2+1" parses as 4).
        pred = _parse_answer(line)
    if not pred:
        pred = _mv_parse(response)
    if not pred:
        return False
    return _mv_verify(gold, pred)


def score_math(
    response: str,
    ground_truth: str,
    convention: str = "pm1",
    *,
    timeout_s: float | None = None,
) -> float:
    """Math-Verify reward (Hugging Face Math-Verify, PyPI ``math-verify``): symbolic equivalence.

    Computes ``verify(parse(ground_truth), parse(pred))`` (gold first: ``verify`` is not
    symmetric), so prompts asking for ``\\boxed{}`` and prompts asking for ``Answer:`` are both
    graded. ``pred`` is

    * the last ``Answer:`` line within the last 300 characters (as in
      :func:`extract_answer_dapo`), when there is one and Math-Verify can parse it -- it is the
      declared final answer, and Math-Verify run on the whole text misses bare answers such as
      ``Answer: x^2+1`` or picks up a stray earlier number instead;
    * otherwise the whole response (Math-Verify's own extraction, ``\\boxed{}`` first).

    Only one answer is ever graded, so hedging ("``\\boxed{3}`` ... Answer: 4") is not rewarded
    twice. Bare ground truths and answer lines are parsed as ``\\boxed{text}`` (whole expression).

    Returns ``1.0`` if equivalent, else ``-1.0`` (``convention="pm1"``) or ``0.0``
    (``convention="01"``). Any exception inside Math-Verify, or exceeding ``timeout_s`` (default
    :data:`MATH_TIMEOUT_S`), counts as incorrect; this function never raises on model output.

    Timeout: Math-Verify's built-in timeouts use ``signal.alarm`` (main thread only), so they are
    disabled and the check runs in a fresh *daemon* thread joined with ``timeout_s``. This works
    from any thread. Python threads cannot be killed: a timed-out check keeps running in the
    background (using CPU, holding the GIL at times) until sympy returns, and its result is
    discarded; being a daemon it never blocks interpreter exit.
    """
    pos, neg = _reward_values(convention)
    if timeout_s is None:
        timeout_s = MATH_TIMEOUT_S
    if not isinstance(response, str):
        return neg
    result: list[bool] = []

    def work() -> None:
        try:
            result.append(bool(_math_equal(response, ground_truth)))
        except BaseException:  # noqa: BLE001 -- incl. math_verify.errors.TimeoutException
            result.append(False)

    worker = threading.Thread(target=work, name="entropy_lens-math-verify", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive() or not result:
        return neg
    return pos if result[0] else neg


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

#: Reward name -> grader ``(response, ground_truth, convention="pm1") -> float``.
REWARDS: dict[str, Callable[..., float]] = {"math": score_math, "dapo": score_dapo}


def get_reward_fn(name: str) -> Callable[..., float]:
    """The grader registered as ``name`` in :data:`REWARDS`; ``ValueError`` listing valid names."""
    try:
        return REWARDS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown reward {name!r}; valid: {', '.join(repr(n) for n in REWARDS)}"
        ) from None


def score_batch(
    responses: list[str],
    ground_truths: list[str],
    name: str = "math",
    convention: str = "pm1",
) -> list[float]:
    """Score ``responses[i]`` against ``ground_truths[i]`` with the reward ``name``.

    ``name`` and ``convention`` are validated up front (``ValueError``), as are equal lengths.
    """
    fn = get_reward_fn(name)
    _reward_values(convention)
    if len(responses) != len(ground_truths):
        raise ValueError(
            f"responses and ground_truths differ in length ({len(responses)} vs {len(ground_truths)})"
        )
    return [fn(r, g, convention) for r, g in zip(responses, ground_truths)]


def overlong_penalty(lengths: list[int], max_len: int, buffer: int, factor: float = 1.0) -> list[float]:
    """DAPO's soft overlong punishment (arXiv:2503.14476, eq. 13), added to the reward.

    For a response of ``|y|`` tokens, with L_max = ``max_len`` and L_cache = ``buffer``:
    0 if |y| ≤ L_max − L_cache; ((L_max − L_cache) − |y|) / L_cache inside the buffer; −1 if
    |y| > L_max — each times ``factor``. A response cut at exactly L_max tokens gets −``factor``.
    ``buffer`` must be in [1, max_len].
    """
    if not 1 <= buffer <= max_len:
        raise ValueError(f"overlong buffer must be in [1, max_len={max_len}], got {buffer}")
    start = max_len - buffer
    out = []
    for n in lengths:
        if n <= start:
            out.append(0.0)
        elif n <= max_len:
            out.append(factor * (start - n) / buffer)
        else:
            out.append(-factor)
    return out
