"""A cache of your own, in a dozen lines: Fast-dLLM's dual cache plus a full refresh every few steps of a block.

See docs/write-your-own-cache.md for the protocol. Compares no cache, the dual cache and this one on the shipped
tiny LLaDA (chain-arith problems, block 32, threshold 0.9): tokens, forwards, time.

    python examples/custom_cache.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401  (registers the model types)
from dlm_generation import CacheStep, DualCache
from dlm_generation.tasks import dev_split, is_correct

FOLDER = Path(__file__).resolve().parents[1] / "model_cards" / "tiny-llada-chain-arith"


class RefreshingDualCache(DualCache):
    """The dual cache, but every `refresh_every`-th step of a block recomputes the whole canvas."""

    # Its settings: the base class fills in defaults, refuses unknown keys and runs the checks when it is built,
    # e.g. RefreshingDualCache({"refresh_every": 2}).
    cache_name = "refreshing_dual"  # the name its error messages use
    cache_config_defaults = {"refresh_every": 4}
    cache_config_checks = {
        "refresh_every": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                          "a positive integer (the steps from one full refresh to the next)"),
    }

    def plan_step(self, canvas, step):
        if step % self.cache_config["refresh_every"] == 0:  # a full forward: everything fresh again
            self.current = CacheStep(0, self.canvas_length, self.canvas_length)
            return self.current
        return super().plan_step(canvas, step)


def main() -> None:
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(FOLDER)
    tokenizer = AutoTokenizer.from_pretrained(FOLDER, padding_side="left")
    problems = list(dev_split(16))
    inputs = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
    common = dict(attention_mask=inputs.attention_mask, max_new_tokens=128, steps=128, block_length=32,
                  alg="low_confidence", threshold=0.9, eos_early_stop=True, return_dict_in_generate=True)
    runs = {"no cache": {}, "dual cache": {"cache_implementation": "dual"},
            "dual, refresh every 4": {"past_key_values": RefreshingDualCache({"refresh_every": 4})}}
    for name, extra in runs.items():
        began = time.perf_counter()
        out = model.diffusion_generate(inputs.input_ids, **common, **extra)
        seconds = time.perf_counter() - began
        texts = tokenizer.batch_decode(out.sequences[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
        solved = sum(is_correct(t, p) for t, p in zip(texts, problems))
        print(f"{name:>22}: {solved}/{len(problems)} solved, {out.nfe} forwards, {seconds:.2f}s")


if __name__ == "__main__":
    main()
