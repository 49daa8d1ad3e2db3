"""What `torch.compile` costs and gains on a dual-cache step's model forward (CPU, float32).

A dual-cache step runs only the block (32 positions here) against preallocated per-layer keys/values of the whole
canvas, so its shapes do not change during a block. This script fills the cache with one full forward, then times
the block forward eager and compiled (inductor, fullgraph=True): compile time, then the median of `--repeats`
calls each, and checks that the logits agree.

    python benchmarks/compile_dual_step.py model_cards/tiny-llada-chain-arith --batch 16 --gen-length 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401  (registers the model types)
from dlm_generation import DualCache
from dlm_generation.tasks import dev_split


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    prompts = [p.prompt for p in dev_split(args.batch)]
    ids = tokenizer(prompts, return_tensors="pt", padding=True).input_ids
    canvas = torch.cat([ids, torch.full((args.batch, args.gen_length), model.config.mask_token_id)], 1)
    start, end = ids.shape[1], ids.shape[1] + args.block_length
    cache = DualCache()
    cache.begin_generation(canvas, None, model.config.mask_token_id)
    cache.begin_block(start, end)
    with torch.inference_mode():
        cache.plan_step(canvas, 0)
        model(canvas, past_key_values=cache)
        cache.plan_step(canvas, 1)
        block = canvas[:, start:end]
        positions = torch.arange(start, end)[None].expand(args.batch, -1)

        def eager():
            return model(block, past_key_values=cache, position_ids=positions).logits

        compiled_forward = torch.compile(model.forward, fullgraph=True)

        def compiled():
            return compiled_forward(input_ids=block, past_key_values=cache, position_ids=positions).logits

        began = time.perf_counter()
        compiled()
        compile_seconds = time.perf_counter() - began
        gap = float((compiled() - eager()).abs().max())
        eager_times, compiled_times = [], []
        for _ in range(args.repeats):  # interleaved, so machine drift hits both alike
            eager_times += timed(eager, 1)
            compiled_times += timed(compiled, 1)
    e, c = statistics.median(eager_times) * 1000, statistics.median(compiled_times) * 1000
    print(f"dual-cache step forward, {args.model.name}, batch {args.batch}, block {args.block_length} against "
          f"{canvas.shape[1]} cached positions, CPU float32, {args.threads} threads, median of {args.repeats}:")
    print(f"  eager {e:.2f} ms, compiled (inductor, fullgraph) {c:.2f} ms: {e / c:.2f}x; compile time "
          f"{compile_seconds:.1f} s, paid back after {compile_seconds * 1000 / max(e - c, 1e-9):.0f} steps; "
          f"max |logit difference| {gap:.1e}")


if __name__ == "__main__":
    main()
