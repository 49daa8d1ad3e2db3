"""The accuracy table of a chain-arith diffusion model (issue targets: long canvases, parallel decoding).

Every row decodes the first `--problems` dev problems greedily, one token per step (`steps = gen_length`, linear
schedule) unless the row commits more, with `eos_early_stop=True`: lossless for the scored text (everything up to
the first EOS is what a run without it writes), and it keeps the long canvases affordable. Rows:

    vanilla-b32-g256     block 32, generation length 256
    vanilla-b32-g1024    block 32, generation length 1024
    threshold-b32-g256   Fast-dLLM threshold 0.9 (alg low_confidence), block 32, length 256
    prefix-threshold-b32-g256, dual-threshold-b32-g256   the same with Fast-dLLM's prefix / dual KV cache
    vanilla-b8-g256      block 8, length 256
    threshold-b8-g256, dual-threshold-b8-g256   threshold 0.9 at block 8 (without / with the dual cache)
    vanilla-1block-g256  one block (the whole canvas), length 256
    dual-threshold-pd*, dual-eb*, elastic-*, *-dpad32-*   issue 25: position decay (PC-Sampler), the entropy bound
                         (EB-Sampler), Elastic-Cache and DPad's suffix window of 32, alone and combined, at 256 / 1024
    bd-*                 block-diffusion models (Fast-dLLM v2; the default rows for one): one token per step
                         (threshold 1) or threshold 0.7-0.9, sub-blocks of 8 or none, at 256 and 1024

`--calibration` adds the reliability table of the committed tokens of the threshold row (confidence bins against
the share of tokens equal to the reference's; `dlm_generation.benchmark.calibration`), which the model card
plots. Results go to `--json` after each row; a rerun skips rows already there for the same model and problem count, so
the long rows can be spread over several invocations.

    python examples/evaluate_chain_arith.py model_cards/tiny-llada-chain-arith --problems 200 \\
        --json model_cards/tiny-llada-chain-arith/accuracy.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401  (registers the model types)
from dlm_generation.benchmark import BASE_CONFIG, calibration, solve
from dlm_generation.tasks import accuracy, dev_split

THRESHOLD = {"alg": "low_confidence", "threshold": 0.9}
DUAL = {"cache_implementation": "dual"}
ROWS = {  # name -> (generation length, block length or None for one block, extra settings)
    "vanilla-b32-g256": (256, 32, {}),
    "vanilla-b32-g1024": (1024, 32, {}),
    "threshold-b32-g256": (256, 32, THRESHOLD),
    "prefix-threshold-b32-g256": (256, 32, {**THRESHOLD, "cache_implementation": "prefix"}),
    "dual-threshold-b32-g256": (256, 32, {**THRESHOLD, "cache_implementation": "dual"}),
    "vanilla-b8-g256": (256, 8, {}),
    "threshold-b8-g256": (256, 8, THRESHOLD),
    "dual-threshold-b8-g256": (256, 8, {**THRESHOLD, "cache_implementation": "dual"}),
    "vanilla-1block-g256": (256, None, {}),
    "dllm-b32-g256": (256, 32, {"cache_implementation": "dllm"}),
    "dllm-threshold-b32-g256": (256, 32, {**THRESHOLD, "cache_implementation": "dllm"}),
    "d2cache-1block-g256": (256, None, {"cache_implementation": "d2cache", "alg": "low_confidence"}),
    "d2cache-threshold-b32-g256": (256, 32, {**THRESHOLD, "cache_implementation": "d2cache",
                                             "cache_config": {"certainty_prior": False}}),
    # Issue 25: parallel decoding that keeps its accuracy at block 32 and flat cost to gen 1024. Position decay
    # (PC-Sampler), the entropy bound (EB-Sampler), Elastic-Cache and DPad's suffix window, alone and combined.
    "dual-threshold-pd0.03-b32-g256": (256, 32, {**THRESHOLD, **DUAL, "position_decay": 0.03}),
    "dual-threshold-pd0.1-b32-g256": (256, 32, {**THRESHOLD, **DUAL, "position_decay": 0.1}),
    "dual-threshold0.8-pd0.1-b32-g256": (256, 32, {**DUAL, "alg": "low_confidence", "threshold": 0.8,
                                                   "position_decay": 0.1}),
    "dual-eb0.1-b32-g256": (256, 32, {**DUAL, "entropy_bound": 0.1}),
    "dual-eb0.03-b32-g256": (256, 32, {**DUAL, "entropy_bound": 0.03}),
    "elastic-threshold-b32-g256": (256, 32, {**THRESHOLD, "cache_implementation": "elastic"}),
    "elastic-threshold-pd0.03-b32-g256": (256, 32, {**THRESHOLD, "cache_implementation": "elastic",
                                                    "position_decay": 0.03}),
    "dual-threshold-dpad32-b32-g256": (256, 32, {**THRESHOLD, **DUAL, "suffix_window": 32}),
    "dual-threshold-pd0.03-dpad32-b32-g256": (256, 32, {**THRESHOLD, **DUAL, "position_decay": 0.03,
                                                        "suffix_window": 32}),
    "dual-threshold-pd0.03-b32-g1024": (1024, 32, {**THRESHOLD, **DUAL, "position_decay": 0.03}),
    "dual-threshold0.8-pd0.03-dpad32-b32-g256": (256, 32, {**DUAL, "alg": "low_confidence", "threshold": 0.8,
                                                           "position_decay": 0.03, "suffix_window": 32}),
    "dual-threshold0.7-pd0.05-dpad32-b32-g256": (256, 32, {**DUAL, "alg": "low_confidence", "threshold": 0.7,
                                                           "position_decay": 0.05, "suffix_window": 32}),
    "dual-threshold0.8-pd0.03-dpad32-b32-g1024": (1024, 32, {**DUAL, "alg": "low_confidence", "threshold": 0.8,
                                                             "position_decay": 0.03, "suffix_window": 32}),
    "dual-threshold0.7-pd0.05-dpad32-b32-g1024": (1024, 32, {**DUAL, "alg": "low_confidence", "threshold": 0.7,
                                                             "position_decay": 0.05, "suffix_window": 32}),
    "dual-threshold-pd0.03-dpad32-b32-g1024": (1024, 32, {**THRESHOLD, **DUAL, "position_decay": 0.03,
                                                         "suffix_window": 32}),
    # Block-diffusion models (Fast-dLLM v2): the exact block cache by default; one token per step is threshold 1
    # (probability > 1 never holds: only the most confident position), as the reference's generate defaults to.
    "bd-one-token-sb8-g256": (256, 32, {"threshold": 1.0, "sub_block_length": 8}),
    "bd-threshold-0.99-sb8-g256": (256, 32, {"threshold": 0.99, "sub_block_length": 8}),
    "bd-threshold-0.95-sb8-g256": (256, 32, {"threshold": 0.95, "sub_block_length": 8}),
    "bd-threshold-0.9-sb8-g256": (256, 32, {"threshold": 0.9, "sub_block_length": 8}),
    "bd-threshold-0.8-sb8-g256": (256, 32, {"threshold": 0.8, "sub_block_length": 8}),
    "bd-threshold-0.7-sb8-g256": (256, 32, {"threshold": 0.7, "sub_block_length": 8}),
    "bd-threshold-0.9-sb32-g256": (256, 32, {"threshold": 0.9, "sub_block_length": 32}),
    "bd-left-to-right-g256": (256, 32, {"threshold": 1.0, "sub_block_length": 1}),  # strictly left to right
    "bd-one-token-sb8-g1024": (1024, 32, {"threshold": 1.0, "sub_block_length": 8}),
    "bd-threshold-0.9-sb8-g1024": (1024, 32, {"threshold": 0.9, "sub_block_length": 8}),
}
BLOCK_DIFFUSION_ROWS = [name for name in ROWS if name.startswith("bd-")]


def row_settings(name: str) -> dict:
    gen_length, block_length, extra = ROWS[name]
    return {**BASE_CONFIG, "steps": gen_length, "block_length": block_length or gen_length, "eos_early_stop": True,
            **extra}


def evaluate_row(model, tokenizer, name: str, problems, batch_size: int) -> dict:
    gen_length, block_length, _ = ROWS[name]
    settings = row_settings(name)
    began = time.perf_counter()
    result = solve(model, tokenizer, problems, gen_length, batch_size, settings, progress=name)
    return {"row": name, "gen_length": gen_length, "block_length": block_length or gen_length,
            "settings": {k: v for k, v in settings.items() if v is not None}, "problems": len(problems),
            "accuracy": accuracy(result.completions, problems),
            "nfe": sum(call["nfe"] for call in result.calls) / len(result.calls),
            "seconds": round(time.perf_counter() - began, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="folder of a chain-arith LLaDA, Dream or Fast-dLLM v2 model")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS),
                        help="default: the block-diffusion rows (bd-*) for a block-diffusion model, the others else")
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration", action="store_true", help="also the reliability table (threshold row)")
    parser.add_argument("--json", type=Path, required=True, help="results file (rows already in it are kept)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    block_diffusion = getattr(model, "diffusion_block_causal", False)
    if args.rows is None:
        args.rows = [n for n in ROWS if (n in BLOCK_DIFFUSION_ROWS) == block_diffusion]
    problems = list(dev_split(args.problems))
    report = json.loads(args.json.read_text()) if args.json.exists() else {}
    if report.get("model") != str(args.model) or report.get("problems") != args.problems:
        report = {"model": str(args.model), "problems": args.problems, "task": "chain-arith dev",
                  "machine": f"{platform.machine()} CPU, {args.threads} threads, float32", "rows": {}}
    for name in args.rows:
        if name in report["rows"]:
            print(f"{name}: {100 * report['rows'][name]['accuracy']:.1f}% (kept)")
            continue
        with torch.inference_mode():
            report["rows"][name] = evaluate_row(model, tokenizer, name, problems, args.batch_size)
        row = report["rows"][name]
        print(f"{name}: {100 * row['accuracy']:.1f}% ({row['nfe']:.0f} forwards per batch, {row['seconds']:.0f}s)",
              flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.calibration and "calibration" not in report:
        name = "bd-threshold-0.9-sb8-g256" if block_diffusion else "threshold-b32-g256"
        with torch.inference_mode():
            report["calibration"] = {"row": name, **calibration(model, tokenizer, problems, ROWS[name][0],
                                                                 args.batch_size, row_settings(name))}
        print(f"calibration ({name}): {report['calibration']['tokens']} committed tokens, token accuracy "
              f"{100 * report['calibration']['token_accuracy']:.1f}%, ECE {report['calibration']['ece']:.3f}")
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
