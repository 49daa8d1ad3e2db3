"""AR-guided diffusion on the shipped models: the tiny Dream drafts, the tiny AR model decides what to commit.

    python examples/guided_generation.py

Decodes two chain-arith questions three ways (vanilla, threshold 0.9, guided) and prints the answers with the
forward counts of each.
"""

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401  (registers LLaDA and Dream with the Auto classes)
from dlm_generation.tasks import ChainArithProblem, is_correct

cards = Path(__file__).resolve().parents[1] / "model_cards"
tokenizer = AutoTokenizer.from_pretrained(cards / "tiny-dream-chain-arith", padding_side="left")
model = AutoModelForCausalLM.from_pretrained(cards / "tiny-dream-chain-arith")
guide = AutoModelForCausalLM.from_pretrained(cards / "tiny-ar-chain-arith")  # the same tokenizer

problems = [
    ChainArithProblem(start=63, ops=(("Subtract", 39), ("Add", 46))),
    ChainArithProblem(start=8, ops=(("Add", 75), ("Subtract", 19), ("Add", 52), ("Subtract", 90))),
]
chats = [[{"role": "user", "content": p.question}] for p in problems]
inputs = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                       return_dict=True)
base = dict(max_new_tokens=256, block_length=32, cache_implementation=None, eos_early_stop=True)  # not the shipped
for name, settings in {
    "vanilla, one token per step": dict(alg="entropy", threshold=None),
    "threshold 0.9": dict(alg="maskgit_plus", threshold=0.9),
    "guided by the AR model": dict(assistant_model=guide, guidance={"strategy": "deterministic"},
                                   block_length=None),
}.items():
    out = model.diffusion_generate(**inputs, return_dict_in_generate=True, **{**base, **settings})
    completions = tokenizer.batch_decode(out.sequences[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    guide_forwards = "" if out.assistant_forwards is None else f" + {out.assistant_forwards} guide forwards"
    print(f"\n{name}: {out.nfe} diffusion forwards{guide_forwards}")
    for problem, completion in zip(problems, completions):
        verdict = "correct" if is_correct(completion, problem) else f"wrong, expected #### {problem.answer}"
        print(f"  {completion.strip()}   [{verdict}]")
