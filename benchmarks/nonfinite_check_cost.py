"""What `diffusion_generate`'s non-finite logits check costs, against the call it runs in.

Each step computes `(~isfinite(logits.amax(-1)) & eligible).any()` on the device and reads the flag at the step's
one existing host sync (the test for masks left), so the check adds no synchronisation, only that small reduction
over the step's logits. This script decodes chain-arith dev problems with the model's shipped configuration,
records the logits and commit window of every step through a forward hook, then times the check's expression on
each of them (median of `--repeats`) and prints its total against the wall time of the calls.

    python benchmarks/nonfinite_check_cost.py model_cards/tiny-llada-chain-arith --batch 16 --problems 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401  (registers the model types)
from dlm_generation.tasks import dev_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a diffusion model folder, e.g. model_cards/tiny-llada-chain-arith")
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20, help="timings of the check per recorded step")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    questions = [[{"role": "user", "content": p.question}] for p in dev_split()[: args.problems]]

    recorded: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda module, inputs, output: recorded.append(output.logits.detach()))
    wall = 0.0
    nfe = 0
    for start in range(0, len(questions), args.batch):
        inputs = tokenizer.apply_chat_template(questions[start : start + args.batch], add_generation_prompt=True,
                                               padding=True, return_tensors="pt", return_dict=True)
        began = time.perf_counter()
        out = model.diffusion_generate(**inputs, max_new_tokens=args.gen_length, return_dict_in_generate=True)
        wall += time.perf_counter() - began
        nfe += out.nfe
    hook.remove()

    def check(logits: torch.Tensor) -> torch.Tensor:  # the loop's expression (eligible: every position)
        eligible = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        return (~torch.isfinite(logits.amax(-1)) & eligible).any()

    check_seconds = 0.0
    for logits in recorded:
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            check(logits)
            times.append(time.perf_counter() - began)
        check_seconds += statistics.median(times)
    shapes = sorted({tuple(logits.shape) for logits in recorded})
    print(f"{args.model}: {args.problems} problems, batch {args.batch}, gen {args.gen_length}, the shipped "
          f"generation_config.json, {args.threads} thread(s), torch {torch.__version__}")
    print(f"forwards: {nfe} ({len(recorded)} recorded); logits shapes: {shapes[0]} .. {shapes[-1]}")
    print(f"decode wall time: {wall:.3f} s; check: {1e6 * check_seconds / len(recorded):.1f} us per step, "
          f"{1e3 * check_seconds:.2f} ms in all = {100 * check_seconds / wall:.3f}% of the wall time")


if __name__ == "__main__":
    main()
