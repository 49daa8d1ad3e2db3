"""Fast-dLLM v2's reference generation code, run unmodified on a tiny random model: golden cases and timings.

Run it in a separate environment with the transformers release the reference targets (4.53) from a scratch folder
outside this repository; it takes the reference's files by path and never copies them here:

* `--model-code DIR`: a folder holding the released checkpoint's `configuration.py` and `modeling.py` (the Hub
  repository Efficient-Large-Model/Fast_dLLM_v2_7B, e.g. from a public mirror); `Fast_dLLM_QwenForCausalLM.generate`
  is the batch-1 reference.
* `--upstream FILE`: NVlabs/Fast-dLLM's `v2/generation_functions.py`, whose `batch_sample` is the batched reference.

    python benchmarks/fast_dllm_v2_reference.py golden --model-code REF/ --upstream REF/generation_functions.py \\
        --out tests/fixtures/golden_block_diffusion

`speed` times one side on the stored tiny model (the same random prompts, greedy, block 32, sub-blocks of 8): run it
once in the reference's environment (`--side reference --model-code ... --upstream ...`) and once in this library's
(`--side ours`), then `compare OURS.json REFERENCE.json` prints identical tokens and the time ratio:

    python benchmarks/fast_dllm_v2_reference.py speed --side ours --batch 8 --json /tmp/ours8.json

`golden` writes a tiny random model with the real architecture (`tiny-fast-dllm-v2/`, saved by the reference's own
classes) and `cases.jsonl`: per case the prompt, the settings, the reference's generated tokens (up to and including
its first stop token) and its number of model forwards (NFE, counted by wrapping `forward`). The reference's
`generate` has no NFE output; the count is prefill + denoising forwards + the forward that adds each completed
block to the cache (the last one also predicts one token past the last block).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

import torch

MASK, STOP, PAD = 500, 501, 502
VOCAB = 512


def load_reference(model_code: Path, upstream: Path | None):
    """Import the reference's configuration/modeling files as a package (they use a relative import)."""
    package = types.ModuleType("fdv2_reference")
    package.__path__ = [str(model_code)]
    sys.modules["fdv2_reference"] = package
    modules = {}
    for name in ("configuration", "modeling"):
        spec = importlib.util.spec_from_file_location(f"fdv2_reference.{name}", model_code / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    batch_sample = None
    if upstream is not None:
        spec = importlib.util.spec_from_file_location("fdv2_generation_functions", upstream)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        batch_sample = module.Fast_dLLM_QwenForCausalLM.batch_sample
    return modules["configuration"], modules["modeling"], batch_sample


def tiny_model(configuration, modeling, seed: int = 0):
    """A tiny random model of the released architecture (Qwen2 body, bd_size 32), weights drawn with a spread that
    makes its predictions confident enough to exercise the threshold (the default init is near-uniform)."""
    config = configuration.Fast_dLLM_QwenConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
        bd_size=32, bos_token_id=503, eos_token_id=STOP, pad_token_id=PAD, use_sliding_window=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = modeling.Fast_dLLM_QwenForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            elif parameter.dim() == 1:
                parameter.normal_(0.0, 0.02)
            else:
                parameter.normal_(0.0, 0.25 if "embed" in name or "lm_head" in name else 0.12)
        model.lm_head.weight[STOP] *= 3.0  # the stop token wins now and then, so that cases stop early too
    return model.eval()


class ForwardCounter:
    """Counts `model.forward` calls (the reference calls `self.forward` directly, so hooks would not see them)."""

    def __init__(self, model):
        self.count, original = 0, model.forward

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        model.forward = counted


def cut_at_stop(tokens: list[int]) -> tuple[list[int], bool]:
    return (tokens[: tokens.index(STOP) + 1], True) if STOP in tokens else (tokens, False)


def golden(args) -> None:
    configuration, modeling, batch_sample = load_reference(args.model_code, args.upstream)
    out = args.out
    model = tiny_model(configuration, modeling)
    model.save_pretrained(out / "tiny-fast-dllm-v2", safe_serialization=True)
    counter = ForwardCounter(model)
    generator = torch.Generator().manual_seed(1)
    prompts = {length: torch.randint(4, 500, (1, length), generator=generator) for length in (5, 33, 45, 64, 70)}
    settings = [
        dict(threshold=1, small_block_size=8, block_size=32, max_new_tokens=64),  # generate's defaults: one per step
        dict(threshold=0.9, small_block_size=8, block_size=32, max_new_tokens=64),  # the README / eval setting
        dict(threshold=0.5, small_block_size=8, block_size=32, max_new_tokens=96),
        dict(threshold=0.7, small_block_size=4, block_size=32, max_new_tokens=64),
        dict(threshold=0.9, small_block_size=32, block_size=32, max_new_tokens=64),  # no sub-blocks
        dict(threshold=0.8, small_block_size=8, block_size=16, max_new_tokens=64),  # blocks other than bd_size
    ]
    lines = []
    for dtype in (torch.float64, torch.float32):
        model.to(dtype)
        for length, prompt in prompts.items():
            for setting in settings:
                runs = []
                for _ in range(2):
                    counter.count = 0
                    result = model.generate(prompt.clone(), mask_id=MASK, stop_token=STOP, temperature=0, **setting)
                    output = result[0] if isinstance(result, tuple) else result
                    runs.append((output[0, length:].tolist(), counter.count))
                tokens, stopped = cut_at_stop(runs[0][0])
                name = (f"fast_dllm_v2_generate/p{length}_t{setting['threshold']}_sb{setting['small_block_size']}"
                        f"_b{setting['block_size']}_g{setting['max_new_tokens']}/{str(dtype)[6:]}")
                lines.append({
                    "id": name, "reference": "generate", "dtype": str(dtype)[6:], "args": setting,
                    "input_ids": prompt.tolist(), "generated": [tokens], "stopped": [stopped], "nfe": runs[0][1],
                    "rerun_identical": runs[0] == runs[1],
                })
        if batch_sample is not None:  # right-padded batches (the reference pads prompts with the mask id)
            rows = [prompts[5][0], prompts[33][0], prompts[45][0]]
            seq_len = torch.tensor([len(r) for r in rows])
            padded = torch.full((len(rows), int(seq_len.max())), MASK, dtype=torch.long)
            for i, row in enumerate(rows):
                padded[i, : len(row)] = row
            for setting in settings[:4]:
                setting = dict(setting)
                counter.count = 0
                samples = batch_sample(model, padded.clone(), types.SimpleNamespace(pad_token_id=PAD),
                                       setting["block_size"], setting["max_new_tokens"], setting["small_block_size"],
                                       int(seq_len.min()), seq_len.clone(), mask_id=MASK,
                                       threshold=setting["threshold"], stop_token=STOP, top_p=0.95, temperature=0.0)
                generated, stopped = zip(*(cut_at_stop(samples[i][len(row):].tolist()) for i, row in enumerate(rows)))
                name = (f"fast_dllm_v2_batch_sample/b3_t{setting['threshold']}_sb{setting['small_block_size']}"
                        f"_b{setting['block_size']}_g{setting['max_new_tokens']}/{str(dtype)[6:]}")
                lines.append({
                    "id": name, "reference": "batch_sample", "dtype": str(dtype)[6:], "args": setting,
                    "input_ids": [r.tolist() for r in rows], "generated": list(generated), "stopped": list(stopped),
                    "nfe": counter.count, "rerun_identical": None,
                })
    with open(out / "cases.jsonl", "w") as handle:
        for line in lines:
            handle.write(json.dumps(line) + "\n")
    print(f"wrote {len(lines)} cases and the model to {out}; stopped early in "
          f"{sum(any(c['stopped']) for c in lines)}; reruns identical in "
          f"{sum(bool(c['rerun_identical']) for c in lines if c['rerun_identical'] is not None)}")


def make_prompts(count: int, seed: int = 2) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 71, (count,), generator=generator).tolist()
    return [torch.randint(4, 500, (n,), generator=generator).tolist() for n in lengths]


def speed(args) -> None:
    """Time one side on the stored tiny model: the reference (its environment) or this library (this one)."""
    prompts = make_prompts(args.prompts)
    setting = dict(threshold=args.threshold, small_block_size=8, block_size=32, max_new_tokens=args.gen)
    results = {"side": args.side, "batch": args.batch, "setting": setting, "generated": [], "seconds": 0.0}
    if args.side == "reference":
        configuration, modeling, batch_sample = load_reference(args.model_code, args.upstream)
        model = modeling.Fast_dLLM_QwenForCausalLM.from_pretrained(args.model).eval()

        def run(group):
            if args.batch == 1:
                out = model.generate(torch.tensor(group), mask_id=MASK, stop_token=STOP, temperature=0, **setting)
                out = out[0] if isinstance(out, tuple) else out
                return [out[0, len(group[0]):].tolist()]
            seq_len = torch.tensor([len(p) for p in group])
            padded = torch.full((len(group), int(seq_len.max())), MASK, dtype=torch.long)
            for i, p in enumerate(group):
                padded[i, : len(p)] = torch.tensor(p)
            samples = batch_sample(model, padded, types.SimpleNamespace(pad_token_id=PAD), 32, args.gen, 8,
                                   int(seq_len.min()), seq_len, mask_id=MASK, threshold=args.threshold,
                                   stop_token=STOP, top_p=0.95, temperature=0.0)
            return [samples[i][len(p):].tolist() for i, p in enumerate(group)]
    else:
        from dlm_generation import FastDLLMV2Model

        model = FastDLLMV2Model.from_pretrained(args.model).eval()

        def run(group):
            width = max(len(p) for p in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            out = model.diffusion_generate(ids, attention_mask=mask if args.batch > 1 else None,
                                           max_new_tokens=args.gen, threshold=args.threshold, sub_block_length=8,
                                           block_length=32, mask_token_id=MASK, eos_token_id=STOP, pad_token_id=PAD)
            return [row[width:] for row in out.tolist()]
    groups = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    with torch.no_grad():
        run(groups[0])  # warm-up
        best = None
        for _ in range(args.repeats):
            generated, started = [], time.perf_counter()
            for group in groups:
                generated += run(group)
            elapsed = time.perf_counter() - started
            best = elapsed if best is None else min(best, elapsed)
    results["generated"] = [cut_at_stop(g)[0] for g in generated]
    results["prompt_lengths"] = [len(p) for p in prompts]
    results["seconds"] = best
    args.json.write_text(json.dumps(results) + "\n")
    print(f"{args.side}: {len(prompts)} prompts at batch {args.batch}, gen {args.gen}, threshold {args.threshold}: "
          f"{best:.2f} s (best of {args.repeats})")


def compare(args) -> None:
    ours, theirs = (json.loads(path.read_text()) for path in (args.ours, args.reference))
    same = 0
    for length, a, b in zip(ours["prompt_lengths"], ours["generated"], theirs["generated"]):
        # the reference's tokens up to the last aligned block boundary inside our canvas (plus the token after it)
        shared = min(len(b), (length + ours["setting"]["max_new_tokens"]) // 32 * 32 + 1 - length)
        same += a[:shared] == b[:shared]
    print(f"batch {ours['batch']}, gen {ours['setting']['max_new_tokens']}, threshold {ours['setting']['threshold']}: "
          f"identical tokens {same}/{len(ours['generated'])}; ours {ours['seconds']:.2f} s, reference "
          f"{theirs['seconds']:.2f} s, ours / reference {ours['seconds'] / theirs['seconds']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("golden", help="write the tiny model and the golden cases")
    make.add_argument("--model-code", type=Path, required=True, help="folder with configuration.py and modeling.py")
    make.add_argument("--upstream", type=Path, help="NVlabs/Fast-dLLM v2/generation_functions.py (batch_sample)")
    make.add_argument("--out", type=Path, required=True)
    timing = sub.add_parser("speed", help="time one side (run the reference side in the reference's environment)")
    timing.add_argument("--side", choices=("reference", "ours"), required=True)
    timing.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures"
                        / "golden_block_diffusion" / "tiny-fast-dllm-v2")
    timing.add_argument("--model-code", type=Path, help="reference side: folder with configuration.py and modeling.py")
    timing.add_argument("--upstream", type=Path, help="reference side: v2/generation_functions.py (batch_sample)")
    timing.add_argument("--prompts", type=int, default=16)
    timing.add_argument("--batch", type=int, default=1)
    timing.add_argument("--gen", type=int, default=256)
    timing.add_argument("--threshold", type=float, default=0.9)
    timing.add_argument("--repeats", type=int, default=3)
    timing.add_argument("--json", type=Path, required=True)
    both = sub.add_parser("compare", help="identical tokens and the time ratio of two `speed` outputs")
    both.add_argument("ours", type=Path)
    both.add_argument("reference", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if args.command == "compare":
        compare(args)
    elif args.command == "speed":
        speed(args)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        golden(args)
        print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
