"""chain-arith: chained add/subtract word problems with GSM8K-style answers (`#### N`).

Every step of the answer depends on the previous result, so decoding many positions at once without care breaks
it. Format (exact)::

    Question: Start with 63. Subtract 39. Add 46. What is the result?
    Answer: 63 - 39 = 24. 24 + 46 = 70. #### 70

The prompt is everything up to and including ``Answer:``; the completion starts with the space after it and is
followed by the model's end-of-sequence token.

Generation (deterministic given a seed, one ``random.Random(seed)`` drawn in this order): the start value
``a = randint(1, 99)``, the number of operations ``k = randint(1, 4)``, then per operation ``n = randint(1, 99)``
and, only when ``current - n >= 0``, a coin ``random() < 0.5`` choosing Subtract (otherwise Add). An operation
whose subtraction would go negative is always Add, so every intermediate result is a non-negative integer.

Splits:

* **dev**: the first ``DEV_SIZE`` (500) problems drawn from ``random.Random(DEV_SEED)`` (``DEV_SEED = 20261123``).
* **train**: :func:`train_stream`, problem ``i`` drawn from ``random.Random(TRAIN_SEED_BASE + i)`` with
  ``TRAIN_SEED_BASE = 10**9``, so training never touches the dev seed; problems whose prompt equals a dev
  prompt are skipped, so the dev split is never trained on.

Scoring: the answer is the text after the last ``####``, stripped; it is correct iff it equals ``str(result)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

DEV_SEED = 20261123
DEV_SIZE = 500
TRAIN_SEED_BASE = 10**9
MIN_VALUE, MAX_VALUE = 1, 99
MIN_OPS, MAX_OPS = 1, 4

_SYMBOL = {"Add": "+", "Subtract": "-"}


@dataclass(frozen=True)
class ChainArithProblem:
    """One problem: the start value and the ``(operation, operand)`` pairs, with its texts and answer."""

    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def prompt(self) -> str:
        steps = " ".join(f"{op} {n}." for op, n in self.ops)
        return f"Question: Start with {self.start}. {steps} What is the result?\nAnswer:"

    @property
    def question(self) -> str:
        """The question line alone (what a chat user would send; the chat template appends ``Answer:``)."""
        return self.prompt[: -len("\nAnswer:")]

    @property
    def results(self) -> tuple[int, ...]:
        values, current = [], self.start
        for op, n in self.ops:
            current = current + n if op == "Add" else current - n
            values.append(current)
        return tuple(values)

    @property
    def answer(self) -> int:
        return self.results[-1]

    @property
    def completion(self) -> str:
        parts, current = [], self.start
        for (op, n), result in zip(self.ops, self.results):
            parts.append(f"{current} {_SYMBOL[op]} {n} = {result}.")
            current = result
        return " " + " ".join(parts) + f" #### {self.answer}"

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "completion": self.completion, "answer": str(self.answer)}


def generate_problem(rng: random.Random) -> ChainArithProblem:
    """Draw one problem from ``rng`` (see the module docstring for the exact order of draws)."""
    start = rng.randint(MIN_VALUE, MAX_VALUE)
    k = rng.randint(MIN_OPS, MAX_OPS)
    current, ops = start, []
    for _ in range(k):
        n = rng.randint(MIN_VALUE, MAX_VALUE)
        op = "Add" if current - n < 0 or rng.random() >= 0.5 else "Subtract"
        current = current + n if op == "Add" else current - n
        ops.append((op, n))
    return ChainArithProblem(start, tuple(ops))


@lru_cache(maxsize=4)
def dev_split(size: int = DEV_SIZE) -> tuple[ChainArithProblem, ...]:
    """The documented dev split: the first `size` problems of ``random.Random(DEV_SEED)`` (default all 500)."""
    if not 1 <= size <= DEV_SIZE:
        raise ValueError(f"the chain-arith dev split has {DEV_SIZE} problems; got size={size}")
    rng = random.Random(DEV_SEED)
    return tuple(generate_problem(rng) for _ in range(size))


@lru_cache(maxsize=1)
def _dev_prompts() -> frozenset[str]:
    return frozenset(p.prompt for p in dev_split())


def train_problems(start: int, stop: int) -> list[ChainArithProblem]:
    """The training problems of seeds ``TRAIN_SEED_BASE + i`` for ``i`` in ``[start, stop)``, minus dev prompts."""
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    problems = (generate_problem(random.Random(TRAIN_SEED_BASE + i)) for i in range(start, stop))
    return [p for p in problems if p.prompt not in _dev_prompts()]


def train_stream(start_index: int = 0) -> Iterator[ChainArithProblem]:
    """Endless training problems; problem ``i`` comes from ``random.Random(TRAIN_SEED_BASE + i)``.

    Resumable: ``train_stream(i)`` yields exactly what ``train_stream(0)`` yields from its ``i``-th problem on.
    Problems whose prompt is in the dev split are skipped (they are never trained on).
    """
    if start_index < 0:
        raise ValueError(f"start_index must be >= 0, got {start_index}")
    index = start_index
    while True:
        yield from train_problems(index, index + 1)
        index += 1


def extract_answer(text: str) -> str | None:
    """The text after the last ``####``, stripped (None when there is no ``####``)."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip()


def is_correct(completion: str, problem: ChainArithProblem) -> bool:
    """Whether `completion`'s final answer equals the problem's result exactly."""
    return extract_answer(completion) == str(problem.answer)


def accuracy(completions: list[str], problems: list[ChainArithProblem]) -> float:
    """The share of `problems` whose completion (same order) is correct."""
    if len(completions) != len(problems) or not problems:
        raise ValueError(f"need one completion per problem, got {len(completions)} for {len(problems)} problems")
    return sum(is_correct(c, p) for c, p in zip(completions, problems)) / len(problems)
