"""Tasks of the reference trainer: prompts, answers, a verifier and SFT warm-up data.

``arithmetic``: a synthetic task on a character-level vocabulary built in code (no downloads):
``<bos>`` + ``"47+85="`` → ``"132"`` + ``<eos>``. Operands have exactly ``digits`` digits (so every
prompt of a task has the same length), ``n_operands`` of them joined by the operators in ``ops``.
The verifier compares the decoded response (special tokens removed) with the exact answer.

``gsm8k``: GSM8K problems (``problem``, ``answer``) for the bundled chat model, graded with
:mod:`entropy_lens.rewards` (Math-Verify or the DAPO string rule). Problems come from ``task.path``,
else the shipped ``entropy_lens/data/gsm8k_demo.parquet``, else ``$ENTROPY_LENS_DATA/gsm8k_test.parquet``.

A task exposes ``train_problems`` / ``eval_problems`` (lists of :class:`Problem`), ``prompt_ids``
and a reward function ``(response_text, answer) -> float``.
"""

from __future__ import annotations

import importlib
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

#: The arithmetic vocabulary, in id order.
SPECIALS = ("<pad>", "<bos>", "<eos>")
ARITH_SYMBOLS = tuple("0123456789") + ("+", "-", "*", "=")
ARITH_VOCAB = SPECIALS + ARITH_SYMBOLS
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

RewardFn = Callable[[str, str], float]


@dataclass(frozen=True)
class Problem:
    """One prompt: ``text`` shown to the model and the exact ``answer`` string."""

    text: str
    answer: str


# ---------------------------------------------------------------------------------------------
# The character tokenizer of the arithmetic task
# ---------------------------------------------------------------------------------------------


class CharTokenizer:
    """Character-level tokenizer over :data:`ARITH_VOCAB` (ids = positions in the tuple).

    ``encode(text)`` → ids (no specials added); ``decode(ids)`` drops ``<pad>/<bos>/<eos>`` unless
    ``skip_special=False``. :meth:`to_hf` gives the equivalent ``PreTrainedTokenizerFast`` for
    checkpoints, so any Hugging Face loader reads the run's checkpoints.
    """

    def __init__(self, vocab: Sequence[str] = ARITH_VOCAB):
        self.vocab = tuple(vocab)
        self.index = {t: i for i, t in enumerate(self.vocab)}
        self.pad_token_id = self.index["<pad>"]
        self.bos_token_id = self.index["<bos>"]
        self.eos_token_id = self.index["<eos>"]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the arithmetic vocabulary") from None

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        skip = {self.pad_token_id, self.bos_token_id, self.eos_token_id} if skip_special else set()
        return "".join(self.vocab[int(i)] for i in ids if int(i) not in skip)

    def to_hf(self):
        """The same vocabulary as a ``transformers.PreTrainedTokenizerFast`` (one token per
        character, decoded without separators)."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tk = Tokenizer(models.WordLevel(vocab=dict(self.index), unk_token="<pad>"))
        tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tk.decoder = decoders.Fuse()
        return PreTrainedTokenizerFast(
            tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<pad>"
        )


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


class ArithmeticTask:
    """``n_operands`` integers of exactly ``digits`` digits joined by operators drawn from ``ops``.

    All problems are enumerated (or, when there are more than ``max_pool``, drawn without
    replacement with ``split_seed``); ``eval_size`` of them form a fixed held-out eval set that the
    RL and SFT batches never draw from. Reward: ``correct`` if the response text equals the answer,
    else ``incorrect``.
    """

    name = "arithmetic"

    def __init__(
        self,
        digits: int = 2,
        n_operands: int = 2,
        ops: str = "+",
        eval_size: int = 256,
        split_seed: int = 1234,
        correct: float = 1.0,
        incorrect: float = -1.0,
        max_pool: int = 200_000,
    ):
        if digits < 1 or digits > 6:
            raise ValueError(f"task.digits must be in [1, 6], got {digits}")
        if n_operands < 2 or n_operands > 4:
            raise ValueError(f"task.n_operands must be in [2, 4], got {n_operands}")
        if not ops or any(o not in OPS for o in ops):
            raise ValueError(f"task.ops must be a non-empty string of + - *, got {ops!r}")
        self.tokenizer = CharTokenizer()
        self.correct, self.incorrect = float(correct), float(incorrect)
        lo, hi = (10 ** (digits - 1) if digits > 1 else 0), 10**digits - 1
        n_values = hi - lo + 1
        ops_u = sorted(set(ops))
        total = n_values**n_operands * len(ops_u) ** (n_operands - 1)
        rng = random.Random(split_seed)
        if total <= max_pool:
            codes = list(range(total))
            rng.shuffle(codes)
        else:
            codes = rng.sample(range(total), max_pool)
        problems = [self._decode_code(c, lo, n_values, ops_u, n_operands) for c in codes]
        if not 0 <= eval_size < len(problems):
            raise ValueError(f"task.eval_size must be in [0, {len(problems) - 1}], got {eval_size}")
        self.eval_problems = problems[:eval_size]
        self.train_problems = problems[eval_size:]
        self.max_answer_len = max(len(p.answer) for p in problems)

    @staticmethod
    def _decode_code(code: int, lo: int, n_values: int, ops_u: list[str], n_operands: int) -> Problem:
        vals = []
        for _ in range(n_operands):
            code, v = divmod(code, n_values)
            vals.append(lo + v)
        ops = []
        for _ in range(n_operands - 1):
            code, o = divmod(code, len(ops_u))
            ops.append(ops_u[o])
        text = str(vals[0]) + "".join(o + str(v) for o, v in zip(ops, vals[1:])) + "="
        return Problem(text=text, answer=str(_evaluate(vals, ops)))

    def prompt_ids(self, problem: Problem) -> list[int]:
        return [self.tokenizer.bos_token_id] + self.tokenizer.encode(problem.text)

    def answer_ids(self, problem: Problem) -> list[int]:
        """SFT target: the answer's characters and ``<eos>``."""
        return self.tokenizer.encode(problem.answer) + [self.tokenizer.eos_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def reward(self, response: str, answer: str) -> float:
        """``correct`` iff the response text is exactly the answer."""
        return self.correct if response.strip() == answer else self.incorrect

    @property
    def max_new_tokens(self) -> int:
        return self.max_answer_len + 1


def _evaluate(vals: list[int], ops: list[str]) -> int:
    """Value of ``v0 o1 v1 o2 v2 ...`` with the usual precedence (* before + and -)."""
    terms, signs = [vals[0]], []
    for o, v in zip(ops, vals[1:]):
        if o == "*":
            terms[-1] = terms[-1] * v
        else:
            signs.append(o)
            terms.append(v)
    out = terms[0]
    for s, t in zip(signs, terms[1:]):
        out = OPS[s](out, t)
    return out


class GSM8KTask:
    """Math word problems for a chat model (the bundled SmolLM2-135M-Instruct, or any chat model).

    Problems come from ``path`` (:func:`load_gsm8k_problems`: columns ``problem``, ``answer``, or a
    verl-schema parquet such as DAPO-Math-17k, gsm8k_test, math500); ``name`` is ``gsm8k`` (default
    file: the shipped problems) or ``math`` (any file, ``path`` required). The first ``eval_size``
    unique problems are the eval set, the rest the training prompts. Reward:
    :func:`entropy_lens.rewards.get_reward_fn` (``math`` or ``dapo``) with the ``pm1`` or ``01``
    convention.
    """

    def __init__(self, tokenizer, path: str | None = None, eval_size: int = 8, reward: str = "math",
                 convention: str = "pm1", instruction: str | None = None, max_new_tokens: int = 128,
                 name: str = "gsm8k"):
        self.name = name
        from entropy_lens.io.prompts import DEFAULT_INSTRUCTION
        from entropy_lens.rewards import CONVENTIONS, get_reward_fn

        self.tokenizer = tokenizer
        self._grade = get_reward_fn(reward)
        if convention not in CONVENTIONS:
            raise ValueError(f"task.convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
        self.convention = convention
        self.correct, self.incorrect = CONVENTIONS[convention]
        self.instruction = instruction or DEFAULT_INSTRUCTION
        self._max_new = int(max_new_tokens)
        problems = load_gsm8k_problems(path)
        if not 0 <= eval_size < len(problems):
            raise ValueError(
                f"task.eval_size must be in [0, {len(problems) - 1}] for the {len(problems)} problems of "
                f"{path or default_gsm8k_path()}, got {eval_size}"
            )
        self.eval_problems = problems[:eval_size]
        self.train_problems = problems[eval_size:]

    def prompt_ids(self, problem: Problem) -> list[int]:
        from entropy_lens.io.prompts import chat_prompt_ids

        return chat_prompt_ids(self.tokenizer, [{"role": "user", "content": f"{problem.text}\n\n{self.instruction}"}])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def reward(self, response: str, answer: str) -> float:
        return float(self._grade(response, answer, self.convention))

    @property
    def max_new_tokens(self) -> int:
        return self._max_new


#: Environment variable naming a folder of verl-schema datasets (the unshipped GSM8K test set).
DATA_ENV = "ENTROPY_LENS_DATA"
#: File of the GSM8K test set inside ``$ENTROPY_LENS_DATA``.
GSM8K_TEST_FILE = "gsm8k_test.parquet"


def default_gsm8k_path() -> Path:
    """GSM8K problems when ``task.path`` is not given: the shipped ``entropy_lens/data/gsm8k_demo.parquet``,
    else ``$ENTROPY_LENS_DATA/gsm8k_test.parquet``; neither → ``ValueError`` saying how to give one."""
    from entropy_lens.data import DEMO_PROBLEMS

    if DEMO_PROBLEMS.is_file():
        return DEMO_PROBLEMS
    root = os.environ.get(DATA_ENV, "").strip()
    if root:
        return Path(root).expanduser() / GSM8K_TEST_FILE
    raise ValueError(
        f"no GSM8K problems: {DEMO_PROBLEMS.name} is not installed in entropy_lens/data; give a problem file "
        f"with --set task.path=FILE or set {DATA_ENV} to a folder holding {GSM8K_TEST_FILE}"
    )


def load_gsm8k_problems(path: str | Path | None = None) -> list[Problem]:
    """Problems of a math dataset file (:func:`entropy_lens.io.datasets.load_problems`: a
    ``problem``/``answer`` table or verl's schema, template defects handled, repeated problems
    collapsed; problems repeated with different answers — five in DAPO-Math-17k — left out)."""
    from entropy_lens.io.datasets import load_problems

    p = Path(path) if path else default_gsm8k_path()
    if not p.is_file():
        hint = f" (from {DATA_ENV}; set task.path=FILE or {DATA_ENV}=DIR)" if not path else ""
        raise ValueError(f"{p}: no such problem file{hint}")
    df = load_problems(p, conflicts="drop")
    return [Problem(text=t, answer=a) for t, a in zip(df["problem"].tolist(), df["answer"].tolist())]


# ---------------------------------------------------------------------------------------------
# Rewards: built-in or user-supplied
# ---------------------------------------------------------------------------------------------


def resolve_reward(spec: str | None, task) -> tuple[str, RewardFn]:
    """``(name, fn)`` of the reward: ``None``/``"task"`` → the task's own verifier;
    ``"module:function"`` → that function (called as ``fn(response_text, answer) -> float``)."""
    if spec in (None, "", "task"):
        return f"{task.name} verifier", task.reward
    mod_name, sep, attr = str(spec).partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"task.reward must be 'task' or 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"task.reward {spec!r}: cannot import ({exc})") from None
    if not callable(fn):
        raise ValueError(f"task.reward {spec!r} is not callable")
    return str(spec), fn


def score_responses(fn: RewardFn, name: str, responses: list[str], problems: list[Problem]) -> list[float]:
    """Rewards of every response; a reward function that raises or returns a non-finite value is a
    ``ValueError`` naming the function, the response index and the problem."""
    out = []
    for i, (resp, prob) in enumerate(zip(responses, problems)):  # verifiers are per-sample Python code
        try:
            r = float(fn(resp, prob.answer))
        except Exception as exc:
            raise ValueError(
                f"reward function {name} raised {type(exc).__name__} on response {i} "
                f"(prompt {prob.text[:40]!r}): {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        if not math.isfinite(r):
            raise ValueError(f"reward function {name} returned {r} on response {i} (prompt {prob.text[:40]!r})")
        out.append(r)
    return out


# ---------------------------------------------------------------------------------------------
# SFT warm-up data
# ---------------------------------------------------------------------------------------------


def sft_batch(task: ArithmeticTask, idx: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """``(prompt_ids, target_ids)`` of the training problems ``idx`` (target = answer + ``<eos>``)."""
    probs = [task.train_problems[int(i)] for i in idx]
    return [task.prompt_ids(p) for p in probs], [task.answer_ids(p) for p in probs]
