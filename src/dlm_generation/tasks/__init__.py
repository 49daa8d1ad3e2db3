"""Offline evaluation tasks (data generators and scorers)."""

from .chain_arith import (
    DEV_SEED,
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

__all__ = [
    "DEV_SEED",
    "DEV_SIZE",
    "ChainArithProblem",
    "accuracy",
    "dev_split",
    "extract_answer",
    "generate_problem",
    "is_correct",
    "train_problems",
    "train_stream",
]
