"""Side by side with NVlabs Fast-dLLM v1's LLaDA code (`llada/generate.py`) on the same weights and prompts.

Fast-dLLM's code is not part of this repository: pass the folder of a checkout with `--fastdllm`. Both layouts
work: `v1/llada/` (later snapshots, e.g. a9b81e4) and `llada/` (the first public snapshot, 24cc59e), for example
`git -C FAST_DLLM_CLONE archive 24cc59e llada | tar -x -C SCRATCH/v1`, then `--fastdllm SCRATCH`.
Its model class is loaded unmodified from that folder and given the shipped model's safetensors (its
`from_pretrained` does not run on transformers v5, so the harness builds the model from its config and loads the
state dict strictly; `use_cache` is set on its config, which v5 no longer defaults).

For every chain-arith problem (batch 1, as Fast-dLLM's LLaDA functions run), each function pair is timed
round-robin (`--repeats` passes, median): `generate` vs ours without cache, `generate_with_prefix_cache` vs
`cache_implementation="prefix"`, `generate_with_dual_cache` vs `"dual"`, all with threshold 0.9, block 32, greedy,
no early stop (Fast-dLLM has none). It counts the problems with identical output tokens, and with identical tokens and
NFE, and prints our time
over theirs.

    python benchmarks/fastdllm_side_by_side.py --fastdllm SCRATCH model_cards/tiny-llada-chain-arith \\
        --problems 20 --gen-length 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401  (registers the model types)
from dlm_generation.tasks import dev_split

PAIRS = {  # name -> (Fast-dLLM function name, our cache_implementation)
    "no cache": ("generate", None),
    "prefix cache": ("generate_with_prefix_cache", "prefix"),
    "dual cache": ("generate_with_dual_cache", "dual"),
}


def load_fastdllm(checkout: Path, folder: Path):
    candidates = [checkout / "v1" / "llada", checkout / "llada"]
    source = next((c for c in candidates if (c / "generate.py").exists()), None)
    if source is None:
        raise SystemExit(f"no llada/generate.py under {checkout}: pass the folder of a Fast-dLLM checkout (it holds "
                         "v1/llada/ or llada/)")
    sys.path.insert(0, str(source))
    import generate  # noqa: PLC0415  (Fast-dLLM's module, from the checkout)
    from model.configuration_llada import LLaDAConfig  # noqa: PLC0415
    from model.modeling_llada import LLaDAModelLM  # noqa: PLC0415

    config = LLaDAConfig.from_pretrained(folder)
    config.use_cache = False
    model = LLaDAModelLM(config)
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return generate, model.float().eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a LLaDA model folder (e.g. model_cards/tiny-llada-chain-arith)")
    parser.add_argument("--fastdllm", type=Path, required=True, help="a Fast-dLLM checkout (holding v1/llada/ or llada/)")
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ours = AutoModelForCausalLM.from_pretrained(args.model).eval()  # first: Fast-dLLM's import re-registers "llada"
    generate, theirs = load_fastdllm(args.fastdllm, args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    mask_id = ours.config.mask_token_id
    settings = dict(steps=args.gen_length, block_length=args.block_length, threshold=args.threshold)
    with torch.inference_mode():
        logit_gap = float((theirs(tokenizer("Question:", return_tensors="pt").input_ids).logits
                           - ours(tokenizer("Question:", return_tensors="pt").input_ids).logits).abs().max())
    rows = {}
    for name, (function, cache) in PAIRS.items():
        times = {"theirs": [], "ours": []}
        identical, same_tokens, nfe = 0, 0, {"theirs": 0, "ours": 0}
        for problem in dev_split(args.problems):
            ids = tokenizer([problem.prompt], return_tensors="pt").input_ids
            for repeat in range(args.repeats + 1):  # the first pass warms up and is not timed
                with torch.inference_mode():
                    began = time.perf_counter()
                    x, their_nfe = getattr(generate, function)(theirs, ids, gen_length=args.gen_length, mask_id=mask_id,
                                                               **settings)
                    their_seconds = time.perf_counter() - began
                    began = time.perf_counter()
                    out = ours.diffusion_generate(ids, max_new_tokens=args.gen_length, alg="low_confidence",
                                                  eos_early_stop=False, cache_implementation=cache,
                                                  return_dict_in_generate=True, **settings)
                    our_seconds = time.perf_counter() - began
                if repeat:
                    times["theirs"].append(their_seconds)
                    times["ours"].append(our_seconds)
            same_tokens += torch.equal(x, out.sequences)
            identical += torch.equal(x, out.sequences) and int(their_nfe) == out.nfe
            nfe["theirs"] += int(their_nfe)
            nfe["ours"] += out.nfe
        # per problem the median of its repeats, summed over problems
        per_problem = args.repeats
        theirs_total = sum(statistics.median(times["theirs"][i:i + per_problem])
                           for i in range(0, len(times["theirs"]), per_problem))
        ours_total = sum(statistics.median(times["ours"][i:i + per_problem])
                         for i in range(0, len(times["ours"]), per_problem))
        rows[name] = {"identical": identical, "identical_tokens": same_tokens, "problems": args.problems, "nfe_theirs": nfe["theirs"],
                      "nfe_ours": nfe["ours"], "seconds_theirs": theirs_total, "seconds_ours": ours_total,
                      "ours_over_theirs": ours_total / theirs_total}
    print(f"Fast-dLLM v1 vs dlm-generation, {args.model.name}, {args.problems} chain-arith dev problems, batch 1, "
          f"gen {args.gen_length}, block {args.block_length}, threshold {args.threshold}, CPU float32, "
          f"{args.threads} threads, median of {args.repeats}; max |logit difference| of the two forwards: {logit_gap:.1e}")
    print("| function | identical tokens | identical tokens and NFE | NFE (theirs / ours) | seconds (theirs / ours) | ours / theirs |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['identical_tokens']}/{r['problems']} | {r['identical']}/{r['problems']} | {r['nfe_theirs']} / {r['nfe_ours']} | "
              f"{r['seconds_theirs']:.2f} / {r['seconds_ours']:.2f} | {r['ours_over_theirs']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"model": str(args.model),
                                                                   "fastdllm": args.fastdllm.name,
                                                                   "json": str(args.json)},
                                         "logit_gap": logit_gap, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
