"""SDAR's reference generation code, run unmodified on a tiny random model: golden cases and timings.

Run it in a separate environment with the transformers release the reference targets (4.53; the checkpoint's code
was written for 4.52) from a scratch folder outside this repository; it takes the reference's files from a checkout
of github.com/JetAstra/SDAR (`--checkout`) and never copies them here:

* the model: `training/model/SDAR-4B-Chat/{configuration_sdar,modeling_sdar,fused_linear_diffusion_cross_entropy}.py`
  (the code the released checkpoints ship), loaded with `trust_remote_code` from a folder the harness writes;
* the decoding: `block_diffusion_generate` of `evaluation/opencompass/opencompass/models/huggingface_bd3.py`, the
  authors' evaluation (`BD3withChatTemplate`, with `temperature=1.0, top_k=1`: greedy tokens, confidence the
  softmax probability). Only its generation functions are executed (their source text as it is), so OpenCompass
  itself need not be installed.

The released modeling file imports two CUDA kernels at module level: flash-attn's `rms_norm_fn` and
`flash_attn_func`. The harness puts a `flash_attn` package on the path that computes both with PyTorch (RMSNorm as
the file's own commented-out fallback does; attention with SDPA), so the reference runs on CPU. `triton` must be
installed (the training loss file imports it; nothing calls it).

    python benchmarks/sdar_reference.py golden --checkout SDAR/ --out tests/fixtures/golden_sdar

`speed` times one side on the stored tiny model; run it once in the reference's environment (`--side reference
--checkout ...`) and once in this library's (`--side ours`), then `compare OURS.json REFERENCE.json`.

`golden` writes a tiny random model of the released architecture (`tiny-sdar/`, saved by the reference's classes)
and `cases.jsonl`: per case the prompt, the settings, the reference's generated tokens (up to and including its first
stop token) and its number of model forwards (NFE, counted by wrapping `forward`): the prefill, every denoising
forward, and the forward that stores each completed block in the cache (the last block's too).
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

MASK, STOP, STOP2, PAD = 500, 501, 502, 503
VOCAB = 512
MODEL_FILES = ("configuration_sdar.py", "modeling_sdar.py", "fused_linear_diffusion_cross_entropy.py")
GENERATION_FUNCTIONS = ("add_gumbel_noise", "top_k_logits", "top_p_logits", "sample_with_temperature_topk_topp",
                        "get_num_transfer_tokens", "block_diffusion_generate")

FLASH_ATTN_SHIM = {
    "flash_attn/__init__.py": '''"""CPU stand-in for flash-attn's dense attention (layout batch, length, heads, head_dim)."""
import torch.nn.functional as F


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def flash_attn_varlen_func(*args, **kwargs):
    raise NotImplementedError("not used at inference")
''',
    "flash_attn/bert_padding.py": '''def _unused(*args, **kwargs):
    raise NotImplementedError("not used at inference")


index_first_axis = pad_input = unpad_input = _unused
''',
    "flash_attn/ops/__init__.py": "",
    "flash_attn/ops/triton/__init__.py": "",
    "flash_attn/ops/triton/layer_norm.py": '''"""CPU stand-in for flash-attn's fused RMSNorm: the released modeling file's own commented-out fallback."""
import torch


def rms_norm_fn(x, weight, bias=None, eps=1e-6, **kwargs):
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * hidden.to(input_dtype)
    return out if bias is None else out + bias
''',
}


def generation_functions(checkout: Path) -> dict:
    """The evaluation file's generation functions, executed from their unchanged source text."""
    path = checkout / "evaluation/opencompass/opencompass/models/huggingface_bd3.py"
    source = path.read_text()
    tree = ast.parse(source)
    import numpy as np
    import torch.nn.functional as F
    from transformers.cache_utils import DynamicCache

    namespace = {"torch": torch, "np": np, "F": F, "DynamicCache": DynamicCache}
    found = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in GENERATION_FUNCTIONS]
    if sorted(node.name for node in found) != sorted(GENERATION_FUNCTIONS):
        sys.exit(f"{path} does not define {GENERATION_FUNCTIONS}")
    for node in found:
        exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def reference_folder(checkout: Path, config: dict, scratch: Path) -> Path:
    """A model folder the reference loads with trust_remote_code: its code files, the given config.json."""
    shim = scratch / "shim"
    for name, text in FLASH_ATTN_SHIM.items():
        (shim / name).parent.mkdir(parents=True, exist_ok=True)
        (shim / name).write_text(text)
    if str(shim) not in sys.path:
        sys.path.insert(0, str(shim))
    folder = scratch / "model"
    folder.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy(checkout / "training/model/SDAR-4B-Chat" / name, folder / name)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def tiny_config(checkout: Path) -> dict:
    """The released 4B config with tiny dimensions (Qwen3 body: hidden 64, 2 layers, 4 heads, 2 KV heads, head_dim
    32, vocabulary 512; block_size 4)."""
    config = json.loads((checkout / "training/model/SDAR-4B-Chat/config.json").read_text())
    config.update(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rope_theta=10000.0,
                  max_window_layers=2, mask_token_id=MASK, bos_token_id=504, eos_token_id=STOP, pad_token_id=PAD,
                  torch_dtype="float32")
    return config


def load_reference_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.float32).eval()


def widen(model, seed: int = 0) -> None:
    """Weights drawn wider than the default init (near-uniform predictions would make every step a tie), the stop
    tokens' output rows scaled so that cases stop now and then."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            elif parameter.dim() == 1:
                parameter.normal_(0.0, 0.02)
            else:
                parameter.normal_(0.0, 0.25 if "embed" in name or "lm_head" in name else 0.12)
        model.lm_head.weight[STOP] *= 3.2
        model.lm_head.weight[STOP2] *= 2.8


class ForwardCounter:
    """Counts `model.forward` calls (the reference calls the model directly)."""

    def __init__(self, model):
        self.count, original = 0, model.forward

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        model.forward = counted


def cut_at_stop(tokens: list[int], stops=(STOP, STOP2)) -> tuple[list[int], bool]:
    first = next((i for i, t in enumerate(tokens) if t in stops), None)
    return (tokens, False) if first is None else (tokens[: first + 1], True)


def reference_generate(functions, model, prompt: list[int], setting: dict) -> list[int]:
    ids = torch.tensor([prompt])
    tokens = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = functions["block_diffusion_generate"](
        model, None, tokens, mask_id=MASK, gen_length=setting["gen_length"], block_length=setting["block_length"],
        denoising_steps=setting["denoising_steps"], temperature=1.0, top_k=1, top_p=1.0, remasking="low_confidence",
        threshold=setting["threshold"], stopping_criteria_idx=[STOP, STOP2])
    return out[0, len(prompt):].tolist()


def golden(args) -> None:
    functions = generation_functions(args.checkout)
    out = args.out
    with tempfile.TemporaryDirectory() as scratch:
        folder = reference_folder(args.checkout, tiny_config(args.checkout), Path(scratch))
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, torch_dtype=torch.float32)
        widen(model)
        model.save_pretrained(out / "tiny-sdar", safe_serialization=True)
        for code in (out / "tiny-sdar").glob("*.py"):  # the reference's code files are not stored with the cases
            code.unlink()
        model.eval()
        counter = ForwardCounter(model)
        generator = torch.Generator().manual_seed(1)
        prompts = {n: torch.randint(4, 500, (n,), generator=generator).tolist() for n in (3, 8, 13, 22, 31)}
        settings = [  # (block_length, denoising_steps, threshold): threshold 1.0 = low_confidence static
            (4, 4, 1.0),  # the authors' evaluation (static) and their README's block / steps
            (4, 4, 0.95),  # the evaluation's dynamic setting
            (4, 4, 0.9),  # the README's dynamic example
            (4, 2, 1.0),  # two tokens per step
            (8, 4, 0.8),  # dynamic with two tokens per step: at least the schedule's count
            (8, 8, 0.5),
            (16, 4, 0.7),
        ]
        lines = []
        for dtype in (torch.float64, torch.float32):
            model.to(dtype)
            for length, prompt in prompts.items():
                for block, steps, threshold in settings:
                    # the reference's canvas is whole blocks: pick a length that ends on a block boundary
                    gen = args.gen + (-(length + args.gen)) % block
                    setting = dict(gen_length=gen, block_length=block, denoising_steps=steps, threshold=threshold)
                    runs = []
                    for _ in range(2):
                        counter.count = 0
                        runs.append((reference_generate(functions, model, prompt, setting), counter.count))
                    tokens, stopped = cut_at_stop(runs[0][0])
                    name = f"sdar_bd3/p{length}_b{block}_s{steps}_t{threshold}_g{gen}/{str(dtype)[6:]}"
                    lines.append({
                        "id": name, "reference": "block_diffusion_generate", "dtype": str(dtype)[6:],
                        "args": setting, "input_ids": [prompt], "generated": [tokens], "stopped": [stopped],
                        "nfe": runs[0][1], "rerun_identical": runs[0] == runs[1],
                    })
    with open(out / "cases.jsonl", "w") as handle:
        for line in lines:
            handle.write(json.dumps(line) + "\n")
    print(f"wrote {len(lines)} cases and the model to {out}; stopped early in "
          f"{sum(any(c['stopped']) for c in lines)}; reruns identical in "
          f"{sum(bool(c['rerun_identical']) for c in lines)}")


def make_prompts(count: int, seed: int = 2) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 41, (count,), generator=generator).tolist()
    return [torch.randint(4, 500, (n,), generator=generator).tolist() for n in lengths]


def speed(args) -> None:
    """Time one side on the stored tiny model; the reference decodes one prompt per call, ours at `--batch`."""
    prompts = make_prompts(args.prompts)
    results = {"side": args.side, "gen": args.gen, "threshold": args.threshold, "generated": [], "seconds": 0.0}
    if args.side == "reference":
        functions = generation_functions(args.checkout)
        scratch = Path(tempfile.mkdtemp())
        folder = reference_folder(args.checkout, json.loads((args.model / "config.json").read_text()), scratch)
        for weights in args.model.glob("*.safetensors"):
            shutil.copy(weights, folder / weights.name)
        model = load_reference_model(folder)

        def run(prompt):
            gen = args.gen + (-(len(prompt) + args.gen)) % 4
            return reference_generate(functions, model, prompt, dict(gen_length=gen, block_length=4,
                                                                     denoising_steps=4, threshold=args.threshold))
        args.batch = 1  # the reference decodes one prompt per call
        run_group = lambda group: [run(group[0])]  # noqa: E731
    else:
        from dlm_generation import SDARForCausalLM

        model = SDARForCausalLM.from_pretrained(args.model).eval()

        def run_group(group):
            width = max(len(p) for p in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            out = model.diffusion_generate(ids, attention_mask=mask if len(group) > 1 else None,
                                           max_new_tokens=args.gen,
                                           threshold=None if args.threshold >= 1 else args.threshold,
                                           eos_token_id=[STOP, STOP2], pad_token_id=PAD)
            return [row[width:] for row in out.tolist()]
    results["batch"] = args.batch
    groups = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    with torch.no_grad():
        run_group(groups[0])  # warm-up
        best = None
        for _ in range(args.repeats):
            generated, started = [], time.perf_counter()
            for group in groups:
                generated += run_group(group)
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
        shared = min(len(b), (length + ours["gen"]) // 4 * 4 - length)  # up to our last aligned block boundary
        same += a[:shared] == b[:shared]
    print(f"batch {ours['batch']} (reference: batch 1, it has no batched decoding), gen {ours['gen']}, threshold "
          f"{ours['threshold']}: identical tokens {same}/{len(ours['generated'])};"
          f" ours {ours['seconds']:.2f} s, reference {theirs['seconds']:.2f} s, ours / reference "
          f"{ours['seconds'] / theirs['seconds']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("golden", help="write the tiny model and the golden cases (reference environment)")
    make.add_argument("--checkout", type=Path, required=True, help="a checkout of github.com/JetAstra/SDAR")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--gen", type=int, default=32, help="new tokens (rounded up to end on a block boundary)")
    timing = commands.add_parser("speed", help="time one side on the stored tiny model")
    timing.add_argument("--side", choices=("reference", "ours"), required=True)
    timing.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures"
                        / "golden_sdar" / "tiny-sdar")
    timing.add_argument("--checkout", type=Path, help="reference side: a checkout of github.com/JetAstra/SDAR")
    timing.add_argument("--prompts", type=int, default=16)
    timing.add_argument("--batch", type=int, default=1, help="our side only (the reference decodes one prompt)")
    timing.add_argument("--gen", type=int, default=128)
    timing.add_argument("--threshold", type=float, default=1.0, help="1 = static (one token per step)")
    timing.add_argument("--repeats", type=int, default=3)
    timing.add_argument("--json", type=Path, required=True)
    both = commands.add_parser("compare", help="tokens and time ratio of two `speed` results")
    both.add_argument("ours", type=Path)
    both.add_argument("reference", type=Path)
    args = parser.parse_args()
    {"golden": golden, "speed": speed, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
