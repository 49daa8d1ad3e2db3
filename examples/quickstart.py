"""Quick start: diffusion_generate on the shipped, trained tiny Dream model (CPU, a few seconds).

    python examples/quickstart.py

Asks chain-arith questions through the tokenizer's chat template, decodes them once one token per step
at block 32 (vanilla) and once with the model's shipped generation_config.json (its fastest configuration within
a point of vanilla accuracy: threshold 0.8 with the dual KV cache at block 32, position decay 0.03 and a suffix
window of 32), and checks each final answer.
"""

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401  (registers LLaDA and Dream with the Auto classes)
from dlm_generation.tasks import ChainArithProblem, is_correct

folder = Path(__file__).resolve().parents[1] / "model_cards" / "tiny-dream-chain-arith"
tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")  # the canvas follows the prompt
model = AutoModelForCausalLM.from_pretrained(folder)

problems = [
    ChainArithProblem(start=63, ops=(("Subtract", 39), ("Add", 46))),  # the task spec's example
    ChainArithProblem(start=8, ops=(("Add", 75), ("Subtract", 19), ("Add", 52), ("Subtract", 90))),
]
chats = [[{"role": "user", "content": p.question}] for p in problems]
inputs = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                       return_dict=True)
shipped = model.generation_config
print("shipped generation_config:", {k: getattr(shipped, k) for k in ("max_new_tokens", "block_length", "alg",
                                                                      "threshold", "position_decay",
                                                                      "suffix_window", "eos_early_stop",
                                                                      "cache_implementation")})
for name, overrides in {
    "vanilla (one token per step, block 32)": dict(alg=None, threshold=None, block_length=32, eos_early_stop=False,
                                                   cache_implementation=None, position_decay=None,
                                                   suffix_window=None),
    "shipped config": {},
}.items():
    out = model.diffusion_generate(**inputs, return_dict_in_generate=True, **overrides)
    completions = tokenizer.batch_decode(out.sequences[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    print(f"\n{name}: {out.nfe} forwards for {out.sequences.shape[1] - inputs.input_ids.shape[1]} positions")
    for problem, completion in zip(problems, completions):
        verdict = "correct" if is_correct(completion, problem) else f"wrong, expected #### {problem.answer}"
        print(f"  {problem.question}\n   ->{completion}   [{verdict}]")
