"""The shipped chain-arith tokenizers' chat template turns what a user types into the training prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dlm_generation.tasks.chain_arith import dev_split

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["tiny-chain-arith-tokenizer", "tiny-llada-chain-arith", "tiny-dream-chain-arith", "tiny-ar-chain-arith"]


@pytest.fixture(scope="module", params=FOLDERS)
def tokenizer(request):
    return AutoTokenizer.from_pretrained(ROOT / "model_cards" / request.param)


def render(tokenizer, *contents: str) -> str:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("typed", [
    "Start with 63. Subtract 39. Add 46.",                                       # a bare question
    "  Start with 63. Subtract 39. Add 46.\n",                                   # with stray whitespace
    "Start with 63. Subtract 39. Add 46. What is the result?",                    # without the prefix
    "Question: Start with 63. Subtract 39. Add 46. What is the result?",          # the full training form
])
def test_every_form_of_a_question_becomes_the_training_prompt(tokenizer, typed):
    problem = "Question: Start with 63. Subtract 39. Add 46. What is the result?\nAnswer:"
    assert render(tokenizer, typed) == tokenizer.bos_token + problem
    # The ids equal the task's own prompt tokenized plainly (the tokenizer prepends the bos token).
    assert tokenizer.apply_chat_template([{"role": "user", "content": typed}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"] == tokenizer(problem).input_ids


def test_dev_questions_render_as_their_prompts(tokenizer):
    for problem in dev_split()[:20]:
        bare = problem.question.removeprefix("Question: ").removesuffix(" What is the result?")
        assert render(tokenizer, bare) == tokenizer.bos_token + problem.prompt


def test_a_conversation_keeps_the_training_format_per_turn(tokenizer):
    text = render(tokenizer, "Start with 1. Add 2.", "1 + 2 = 3. #### 3", "Start with 3. Add 4.")
    assert text == (f"{tokenizer.bos_token}Question: Start with 1. Add 2. What is the result?\nAnswer: 1 + 2 = 3. "
                    f"#### 3{tokenizer.eos_token}Question: Start with 3. Add 4. What is the result?\nAnswer:")


def test_other_roles_are_refused(tokenizer):
    with pytest.raises(Exception, match="only user and assistant messages"):
        tokenizer.apply_chat_template([{"role": "system", "content": "be brief"}], tokenize=False)


@pytest.mark.parametrize("folder", ["tiny-llada-chain-arith", "tiny-dream-chain-arith"])
def test_the_cli_answers_a_bare_question(folder, capsys):
    from dlm_generation import cli

    assert cli.main([str(ROOT / "model_cards" / folder), "--prompt", "Start with 12. Add 30.",
                     "--prompt", "Start with 63. Subtract 39. Add 46."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("#### 42") and lines[1].endswith("#### 70"), lines


def test_the_help_example_prints_the_right_answer(capsys, monkeypatch):
    """`dlm-generate --help` ends with an example; run from the repository root it answers the question."""
    import re
    import shlex

    from dlm_generation import cli

    example = re.search(r"Example: (dlm-generate .*?) \(", " ".join(cli.build_parser().epilog.split()))
    assert example, cli.build_parser().epilog
    argv = shlex.split(example.group(1))[1:]
    monkeypatch.chdir(ROOT)  # the example names model_cards/... relative to the repository root
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("63 - 39 = 24. 24 + 46 = 70. #### 70"), out
