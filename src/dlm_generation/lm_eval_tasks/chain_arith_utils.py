"""Data and scoring of the chain_arith lm-eval task (see chain_arith.yaml)."""

from __future__ import annotations

import datasets

from dlm_generation.tasks.chain_arith import dev_split, extract_answer


def load_dev(**kwargs) -> datasets.DatasetDict:
    """The dev split as a `datasets.DatasetDict` with prompt, completion and answer columns."""
    rows = [problem.to_dict() for problem in dev_split()]
    return datasets.DatasetDict({"dev": datasets.Dataset.from_list(rows)})


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """The project's scorer: the text after the last `####` must equal the answer exactly."""
    return {"acc": int(extract_answer(results[0]) == doc["answer"])}
