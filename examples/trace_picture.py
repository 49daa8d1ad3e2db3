"""Draw when each token was committed, for three configurations side by side (CPU, a few seconds).

    python examples/trace_picture.py [--model model_cards/tiny-dream-chain-arith] [--out docs/trace.png]

Decodes two chain-arith questions with vanilla decoding (one token per step), Fast-dLLM's threshold 0.9 and the
dual cache with threshold 0.9, saves one panel per configuration (positions across, questions down, colour = the
forward pass that committed the token) and prints the threshold trace of the first question for the terminal.
"""

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401  (registers LLaDA and Dream)
from dlm_generation.tasks.chain_arith import ChainArithProblem, is_correct
from dlm_generation.visualize import plot_commit_trace, render_commit_trace

ROOT = Path(__file__).resolve().parents[1]
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default=str(ROOT / "model_cards" / "tiny-dream-chain-arith"))
parser.add_argument("--out", default=str(ROOT / "docs" / "trace.png"))
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
model = AutoModelForCausalLM.from_pretrained(args.model).eval()
problems = [
    ChainArithProblem(start=63, ops=(("Subtract", 39), ("Add", 46))),
    ChainArithProblem(start=8, ops=(("Add", 75), ("Subtract", 19), ("Add", 52), ("Subtract", 90))),
]
inputs = tokenizer.apply_chat_template([[{"role": "user", "content": p.question}] for p in problems],
                                       add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True)
# Block 32 and no cache unless the row says so (the shipped generation_config.json holds a threshold with the dual
# cache, position decay and a suffix window; None sets each back to the default). alg=None is the family's scorer
# (Dream: entropy); a threshold compares probabilities, so those rows use maskgit_plus.
configurations = {
    "vanilla (one token per step)": dict(threshold=None, alg=None, cache_implementation=None),
    "threshold 0.9": dict(threshold=0.9, alg="maskgit_plus", cache_implementation=None),
    "dual cache + threshold 0.9": dict(threshold=0.9, alg="maskgit_plus", cache_implementation="dual"),
}
outputs = {}
for label, overrides in configurations.items():
    out = model.diffusion_generate(**inputs, block_length=32, eos_early_stop=True, output_commit_steps=True,
                                   position_decay=None, suffix_window=None, return_dict_in_generate=True, **overrides)
    completions = tokenizer.batch_decode(out.sequences[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    solved = sum(is_correct(c, p) for c, p in zip(completions, problems))
    print(f"{label}: {out.nfe} forwards, {solved}/{len(problems)} correct")
    outputs[f"{label}, {solved}/{len(problems)} correct"] = out
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
plot_commit_trace(outputs, tokenizer, path=args.out, block_length=32,
                  title=f"{Path(args.model).name}: commit step of every generated token (block 32)")
print(f"saved {args.out}\n")
threshold = outputs[next(k for k in outputs if k.startswith("threshold"))]
print(render_commit_trace(threshold.sequences[:1, inputs.input_ids.shape[1]:], threshold.commit_steps[:1], tokenizer))
