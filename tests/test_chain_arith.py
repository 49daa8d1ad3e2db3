"""The chain-arith task generator and scorer, checked against its spec (tasks/chain-arith.md)."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from dlm_generation.tasks import (
    DEV_SIZE,
    ChainArithProblem,
    accuracy,
    dev_split,
    extract_answer,
    generate_problem,
    is_correct,
    train_problems,
    train_stream,
)

PROMPT_RE = re.compile(r"Question: Start with (\d+)\.((?: (?:Add|Subtract) \d+\.)+) What is the result\?\nAnswer:")


def test_spec_example_format():
    problem = ChainArithProblem(63, (("Subtract", 39), ("Add", 46)))
    assert problem.prompt == "Question: Start with 63. Subtract 39. Add 46. What is the result?\nAnswer:"
    assert problem.completion == " 63 - 39 = 24. 24 + 46 = 70. #### 70"
    assert problem.answer == 70
    assert problem.question + "\nAnswer:" == problem.prompt


def check_problem(problem: ChainArithProblem) -> None:
    assert PROMPT_RE.fullmatch(problem.prompt), problem.prompt
    assert 1 <= problem.start <= 99 and 1 <= len(problem.ops) <= 4
    current = problem.start
    for op, n in problem.ops:
        assert 1 <= n <= 99
        if current - n < 0:
            assert op == "Add"
        current = current + n if op == "Add" else current - n
        assert current >= 0
    assert current == problem.answer
    steps = problem.completion.split(" #### ")[0].strip().split(". ")
    assert len(steps) == len(problem.ops)
    # every step starts from the previous result
    previous = str(problem.start)
    for step in steps:
        left, result = step.rstrip(".").split(" = ")
        assert left.split(" ")[0] == previous
        assert eval(left) == int(result)  # digits and +/- only
        previous = result


def test_dev_split_is_fixed_and_valid():
    dev = dev_split()
    assert len(dev) == DEV_SIZE == 500
    assert dev == dev_split()  # deterministic
    for problem in dev:
        check_problem(problem)
    # pinned: the documented seed gives these first problems
    assert dev[0].prompt + dev[0].completion == (
        "Question: Start with 97. Subtract 21. Subtract 72. Add 49. Add 50. What is the result?\n"
        "Answer: 97 - 21 = 76. 76 - 72 = 4. 4 + 49 = 53. 53 + 50 = 103. #### 103"
    )
    assert dev[1].completion == " 4 + 13 = 17. #### 17"
    assert dev_split(10) == dev[:10]
    assert {len(p.ops) for p in dev} == {1, 2, 3, 4}


def test_distribution_matches_spec():
    rng = random.Random(0)
    problems = [generate_problem(rng) for _ in range(4000)]
    for problem in problems[:500]:
        check_problem(problem)
    starts = [p.start for p in problems]
    assert min(starts) == 1 and max(starts) == 99
    ks = [len(p.ops) for p in problems]
    assert all(800 < ks.count(k) < 1200 for k in (1, 2, 3, 4))
    # when subtraction is possible it is chosen about half the time
    free = [op for p in problems for (op, n), cur in zip(p.ops, (p.start, *p.results)) if cur - n >= 0]
    assert 0.45 < free.count("Subtract") / len(free) < 0.55


def test_train_stream_is_resumable_and_disjoint_from_dev():
    first = list(itertools.islice(train_stream(), 300))
    assert list(itertools.islice(train_stream(100), 50)) == train_problems(100, 150)
    assert first[:100] == train_problems(0, 100)
    dev_prompts = {p.prompt for p in dev_split()}
    assert not dev_prompts & {p.prompt for p in train_problems(0, 20000)}
    with pytest.raises(ValueError, match="start_index"):
        next(train_stream(-1))
    with pytest.raises(ValueError, match="size"):
        dev_split(501)


def test_scoring():
    problem = ChainArithProblem(63, (("Subtract", 39), ("Add", 46)))
    assert extract_answer(" 63 - 39 = 24. #### 12 #### 70 ") == "70"
    assert extract_answer("no answer") is None
    assert is_correct(problem.completion, problem)
    assert not is_correct(" 63 - 39 = 24. 24 + 46 = 70. #### 71", problem)
    assert not is_correct(" 63 - 39 = 24. 24 + 46 = 70. #### 70.", problem)
    assert not is_correct(" 63 - 39 = 24. 24 + 46 = 70.", problem)
    assert accuracy([problem.completion, " #### 1"], [problem, problem]) == 0.5
    with pytest.raises(ValueError, match="one completion per problem"):
        accuracy([problem.completion], [problem, problem])
