"""Time outside model forwards: `DiffusionEngine` against `diffusion_generate`, one request at a time (batch 1).

Both decode the same chain-arith dev problems with the same settings (by default the model's shipped configuration,
its generation_config.json); a forward pre/post hook on the model adds up the time spent inside its forwards. The
rest of the wall time is the loop's own work: planning, commits, stop checks, and for the engine also building the
shared forward's inputs and its per-request outputs. Prints both fractions and the engine / generate time ratio, and
checks that every request's tokens equal the solo call's.

    python benchmarks/engine_overhead.py model_cards/tiny-llada-chain-arith --problems 20
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401  (registers the model types)
from dlm_generation.engine import DiffusionEngine
from dlm_generation.tasks import dev_split


class ForwardTimer:
    """Adds up the wall time of the model's top-level forwards."""

    def __init__(self, model):
        self.total, self.count, self.started = 0.0, 0, None
        model.register_forward_pre_hook(self.before)
        model.register_forward_hook(self.after)

    def before(self, *_):
        self.started = time.perf_counter()

    def after(self, *_):
        self.total += time.perf_counter() - self.started
        self.count += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a diffusion model folder, e.g. model_cards/tiny-llada-chain-arith")
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", default="{}", help="JSON of config fields (default: the shipped config)")
    args = parser.parse_args()
    import json

    torch.set_num_threads(args.threads)
    settings = {"max_new_tokens": args.gen_length, "steps": args.gen_length, **json.loads(args.settings)}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"] for p in dev_split()[: args.problems]]
    timer = ForwardTimer(model)
    model.diffusion_generate(torch.tensor([prompts[0]]), **settings)  # warm-up
    engine = DiffusionEngine(model, tokenizer, max_batch_size=1)
    engine.generate(prompts[:1], **settings)

    rows = {}
    timer.total = timer.count = 0
    started = time.perf_counter()
    expected = []
    for ids in prompts:
        out = model.diffusion_generate(torch.tensor([ids]), return_dict_in_generate=True, **settings)
        expected.append(out.sequences[0, len(ids):].tolist())
    rows["diffusion_generate"] = (time.perf_counter() - started, timer.total, timer.count)

    timer.total = timer.count = 0
    started = time.perf_counter()
    outputs = []
    for ids in prompts:  # one request at a time: batch 1
        outputs += engine.generate([ids], **settings)
    rows["DiffusionEngine"] = (time.perf_counter() - started, timer.total, timer.count)

    stop_ids = {model.generation_config.eos_token_id, model.generation_config.mask_token_id}
    same = sum(o.token_ids == e[: next((i for i, t in enumerate(e) if t in stop_ids), len(e))]
               for o, e in zip(outputs, expected))
    print(f"{args.model}, {args.problems} problems one at a time, settings {settings}, {args.threads} thread(s)")
    print(f"{'':20s} {'wall s':>8s} {'forwards':>9s} {'in forwards s':>14s} {'outside':>8s}")
    for name, (wall, inside, count) in rows.items():
        print(f"{name:20s} {wall:8.2f} {count:9d} {inside:14.2f} {100 * (wall - inside) / wall:7.1f}%")
    print(f"engine / generate wall time: {rows['DiffusionEngine'][0] / rows['diffusion_generate'][0]:.3f}; "
          f"identical tokens: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
