"""What reading attention weights costs d2Cache (CPU, float32).

d2Cache's rollout needs each layer's head-averaged attention weights. Its reference forces eager attention on every
layer for the whole call; here only a cache that asks for them (`needs_attention_weights`) gets them, from one
explicit softmax over the queries the step runs, which is also the attention output. This script takes a d2Cache
step as it happens during decoding (the positions chosen after a first full forward), times that step's model
forward with the weights read (explicit softmax) and without (SDPA, same positions, same cache), and times the
rollout computed from the weights; it also times a full forward both ways (what the first step costs).

    python benchmarks/d2cache_attention_cost.py model_cards/tiny-llada-chain-arith --batch 1 --gen-length 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401  (registers the model types)
from dlm_generation import D2Cache, StepOutcome
from dlm_generation.tasks import dev_split


class WeightlessD2Cache(D2Cache):
    """The same cache with SDPA attention (no weights read): the baseline of the comparison."""

    needs_attention_weights = False


def median_seconds(fn, repeats: int) -> float:
    return paired_medians([fn], repeats)[0]


def paired_medians(fns, repeats: int) -> list[float]:
    """Median wall time of each function, calling them in turn (so load on the machine affects all alike)."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            began = time.perf_counter()
            fn()
            record.append(time.perf_counter() - began)
    return [statistics.median(record) for record in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    ids = tokenizer([p.prompt for p in dev_split(args.batch)], return_tensors="pt", padding=True).input_ids
    mask_id = model.config.mask_token_id
    canvas = torch.cat([ids, torch.full((args.batch, args.gen_length), mask_id)], 1)
    prompt, length = ids.shape[1], canvas.shape[1]

    def prepared(cls) -> D2Cache:
        """A cache after the call's full first forward, holding the positions the second step runs."""
        cache = cls()
        cache.begin_generation(canvas, None, mask_id, prompt_length=prompt, logits_shift=model.diffusion_logits_shift)
        cache.plan_step(canvas, 0)
        logits = model(canvas, past_key_values=cache).logits[:, prompt:]
        probability = logits.softmax(-1).amax(-1)
        if not cls.needs_attention_weights:  # the rollout needs weights: take them from the weighted cache
            cache.attention = reference.attention
        eligible = torch.ones(args.batch, args.gen_length, dtype=torch.bool)
        committed = torch.zeros_like(eligible)
        committed[:, 0] = True
        cache.end_step(StepOutcome(canvas, prompt, length, eligible, committed, probability))
        cache.plan_step(canvas, 1)
        return cache

    with torch.inference_mode():
        reference = D2Cache()
        reference.begin_generation(canvas, None, mask_id, prompt_length=prompt)
        reference.plan_step(canvas, 0)
        model(canvas, past_key_values=reference)
        weighted, weightless = prepared(D2Cache), prepared(WeightlessD2Cache)
        positions = weighted.current.positions
        inputs, position_ids = canvas.gather(1, positions), positions

        def step(cache):
            return lambda: model(inputs, position_ids=position_ids, past_key_values=cache)

        with_weights, without = paired_medians([step(weighted), step(weightless)], args.repeats)
        rollout = median_seconds(lambda: weighted.rollout_importance(args.batch), args.repeats)
        first = D2Cache()  # before its first step a d2Cache runs everything
        first.begin_generation(canvas, None, mask_id, prompt_length=prompt)
        first.plan_step(canvas, 0)
        full_weighted, full_sdpa = paired_medians([lambda: model(canvas, past_key_values=first), lambda: model(canvas)],
                                                  max(3, args.repeats // 5))
    queries = positions.shape[1]
    print(f"{args.model.name}, batch {args.batch}, canvas {length} ({prompt} prompt + {args.gen_length}), "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"d2Cache step ({queries} of {length} positions): {1000 * without:.2f} ms with SDPA, "
          f"{1000 * with_weights:.2f} ms reading the weights ({with_weights / without:.2f}x); "
          f"rollout from them {1000 * rollout:.2f} ms")
    print(f"full forward (the first step): {1000 * full_sdpa:.2f} ms with SDPA, {1000 * full_weighted:.2f} ms reading "
          f"the weights ({full_weighted / full_sdpa:.2f}x)")


if __name__ == "__main__":
    main()
