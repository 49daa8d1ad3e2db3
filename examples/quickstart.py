"""Quick start: diffusion_generate on the shipped tiny LLaDA model (random weights, so the text is gibberish).

    python examples/quickstart.py
"""

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401  (registers LLaDA and Dream with the Auto classes)

folder = Path(__file__).resolve().parents[1] / "model_cards" / "tiny-random-llada"
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)

prompts = ["Question: Tom has 3 apples and buys 5 more.", "Hello, world!"]
inputs = tokenizer(prompts, return_tensors="pt", padding=True)  # left padding: the canvas follows the prompt
for name, config in {
    "vanilla (1 token / step)": dict(steps=32),
    "Fast-dLLM threshold 0.9": dict(threshold=0.9),
}.items():
    out = model.diffusion_generate(
        inputs.input_ids, attention_mask=inputs.attention_mask, max_new_tokens=32, block_length=8,
        eos_early_stop=True, return_dict_in_generate=True, **config,
    )
    completions = tokenizer.batch_decode(out.sequences[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    print(f"{name}: nfe={out.nfe}, tokens/forward={out.tokens_per_forward.tolist()}")
    for prompt, completion in zip(prompts, completions):
        print(f"  {prompt!r} -> {completion!r}")
