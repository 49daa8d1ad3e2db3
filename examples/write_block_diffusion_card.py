"""Write the card of model_cards/tiny-fastdllm-v2-chain-arith from its measured files.

Reads, in the model folder: `training_log.json` (the training run's log: `runs/fdv2/log.json` of
`examples/train_block_diffusion.py`), `accuracy.json` (`examples/evaluate_chain_arith.py`, the block-diffusion rows
and `--calibration`) and `benchmark.json` (`python -m dlm_generation.benchmark ... --ar-model ...`). Writes
`README.md`, `learning_curve.png` and `calibration.png`.

    python examples/write_block_diffusion_card.py model_cards/tiny-fastdllm-v2-chain-arith
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from write_model_cards import parameter_count, plot_calibration  # noqa: E402

ROWS = {  # evaluate_chain_arith.py rows -> the card's names
    "bd-one-token-sb8-g256": "one token per step (threshold 1), sub-blocks of 8, gen 256",
    "bd-threshold-0.99-sb8-g256": "threshold 0.99, sub-blocks of 8, gen 256",
    "bd-threshold-0.95-sb8-g256": "threshold 0.95, sub-blocks of 8, gen 256",
    "bd-threshold-0.9-sb8-g256": "threshold 0.9, sub-blocks of 8, gen 256",
    "bd-threshold-0.8-sb8-g256": "threshold 0.8, sub-blocks of 8, gen 256",
    "bd-threshold-0.7-sb8-g256": "threshold 0.7, sub-blocks of 8, gen 256",
    "bd-threshold-0.9-sb32-g256": "threshold 0.9, no sub-blocks, gen 256",
    "bd-left-to-right-g256": "strictly left to right (sub-blocks of 1), gen 256",
    "bd-one-token-sb8-g1024": "one token per step, sub-blocks of 8, gen 1024",
    "bd-threshold-0.9-sb8-g1024": "threshold 0.9, sub-blocks of 8, gen 1024",
}


def plot_curve(curve: list[dict], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label in ("one token per step", "threshold 0.9"):
        points = [(c["step"], 100 * c["dev"][label]["accuracy"]) for c in curve]
        ax.plot(*zip(*points), "o-", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("dev accuracy (%), 100 problems")
    ax.set_ylim(0, 100)
    ax.set_title(f"{name}: learning curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    folder, name = args.folder, args.folder.name
    log = json.loads((folder / "training_log.json").read_text())
    accuracy = json.loads((folder / "accuracy.json").read_text())
    bench = json.loads((folder / "benchmark.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    plot_curve(log["curve"], folder / "learning_curve.png", name)
    plot_calibration(accuracy["calibration"], folder / "calibration.png", name)
    minutes = log["train_seconds"] / 60
    run = log["args"]
    invocations = "\n".join(
        f"  - from step {inv['from_step']}: peak learning rate {inv['lr']}, {inv['warmup']} warm-up steps, cosine to "
        f"{inv['min_lr']} at step {inv['steps']}, {inv['threads']} thread(s)" for inv in log["invocations"])
    curve = "\n".join(
        f"| {c['step']} | {c['train_minutes']:.0f} | {'-' if c['loss'] is None else format(c['loss'], '.3f')} | "
        f"{100 * c['dev']['one token per step']['accuracy']:.0f}% ({c['dev']['one token per step']['forwards']:.1f}) | "
        f"{100 * c['dev']['threshold 0.9']['accuracy']:.0f}% ({c['dev']['threshold 0.9']['forwards']:.1f}) |"
        for c in log["curve"])
    rows = accuracy["rows"]
    table = "\n".join(f"| {label} | {rows[key]['problems']} | {100 * rows[key]['accuracy']:.1f}% | {rows[key]['nfe']:.1f} |"
                      for key, label in ROWS.items() if key in rows)
    bench_lines = "\n".join(
        f"| {r['config']} | {r['gen_length']} | {r['batch_size']} | {100 * r['accuracy']:.1f}% | {r['nfe']:.1f} | "
        f"{r['tokens_per_forward']:.2f} | {r['tokens_per_second']:.0f} | {r['speedup']:.2f}x | "
        f"{r['speedup_vs_ar']:.2f}x |" if r.get("speedup_vs_ar") is not None else
        f"| {r['config']} | {r['gen_length']} | {r['batch_size']} | {100 * r['accuracy']:.1f}% | {r['nfe']:.1f} | "
        f"{r['tokens_per_forward']:.2f} | {r['tokens_per_second']:.0f} | {r['speedup']:.2f}x | - |"
        for r in bench["rows"])
    shipped = {k: generation[k] for k in ("threshold", "sub_block_length", "block_length", "cache_implementation",
                                          "eos_early_stop") if k in generation}
    text = f"""---
library_name: dlm-generation
tags: [chain-arith, tiny, diffusion-language-model, block-diffusion]
license: apache-2.0
---
# {name}

A {parameter_count(folder) / 1e6:.2f}M-parameter Fast-dLLM v2 block-diffusion model (`FastDLLMV2Model`, Qwen2
blocks, bidirectional inside blocks of {config["bd_size"]} positions and causal across them, logits shifted by one)
for **chain-arith**, the offline benchmark task of [dlm-generation](../../README.md). It is
`tiny-ar-chain-arith` (the AR baseline) adapted with Fast-dLLM v2's recipe, as Fast-dLLM v2 7B is Qwen2.5-7B adapted.

## Use

```python
import dlm_generation  # registers the architecture (this folder holds no code)
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("model_cards/{name}")
tokenizer = AutoTokenizer.from_pretrained("model_cards/{name}")
ids = tokenizer("Question: Start with 63. Subtract 39. Add 46. What is the result?\\nAnswer:", return_tensors="pt").input_ids
out = model.diffusion_generate(ids)  # the shipped generation_config.json
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
```

`generation_config.json` holds its fastest configuration within one point of its one-token-per-step accuracy
(see Accuracy): `{json.dumps(shipped)}`. The tokenizer is `tiny-chain-arith-tokenizer`'s (`<|mdm_mask|>` = 3 is the
mask token).

## Training

- Objective: `dlm_generation.training.block_diffusion_loss`, Fast-dLLM v2's: the sequence split into blocks of
  {run["block_size"]} tokens, one masking rate per block, the noisy sequence read beside the clean one under the
  block-diffusion attention mask, the complementary mask as a second row (every position is learned once per
  sample), the AR token shift (the logits at i - 1 predict token i). Each sample is the prompt (never masked, not
  learned), the completion and its EOS (learned), padded with the mask token to whole blocks.
- Initialisation: `{run["init_from"]}` (Qwen2; the parameter names carry over unchanged).
- Data: the chain-arith train stream, {log["step"] * run["batch_size"]:,} samples ({log["step"]} steps of
  {run["batch_size"]}).
- Optimiser: AdamW (betas 0.9/0.98, weight decay 0.1), gradient clipping 1.0, warm-up then cosine decay; trained in
  resumable chunks (each session ends its processes; a chunk that resumed from a snapshot restarted Adam's moments):
{invocations}
- Hardware and time: one CPU core, float32; **{minutes:.0f} minutes** of training (evaluation excluded), of the
  issue's budget of 240. Shipped weights: step {log["best_step"]} (best of the worse of the two dev accuracies).
- Reproduce: `python examples/train_block_diffusion.py --out runs/fdv2 --minutes 60 --steps 2000 --threads 1`
  (repeat until the budget is spent; it resumes), then `--export model_cards/{name}`.

Learning curve (the first 100 dev problems, gen 256, decoded as Fast-dLLM v2's `generate` does without a cache;
forwards per problem in brackets; also `training_log.json` and `learning_curve.png`):

| step | minutes | train loss | one token per step | threshold 0.9 |
|---|---|---|---|---|
{curve}

## Accuracy

Chain-arith dev, the first {accuracy["problems"]} problems, greedy, block {config["bd_size"]}, the exact block cache,
early stop; measured by `python examples/evaluate_chain_arith.py model_cards/{name} --problems {accuracy["problems"]}
--calibration --json model_cards/{name}/accuracy.json` ({accuracy["machine"]}):

| decoding | problems | accuracy | forwards per batch of 50 |
|---|---|---|---|
{table}

Calibration of threshold 0.9 decoding (sub-blocks of 8, gen 256): every committed token up to the first EOS, binned
by its confidence, against the share equal to the reference token ({accuracy["calibration"]["tokens"]:,} tokens,
{100 * accuracy["calibration"]["token_accuracy"]:.1f}% correct, ECE {accuracy["calibration"]["ece"]:.3f}).

![reliability diagram](calibration.png) ![learning curve](learning_curve.png)

## Speed against the AR model

`{bench.get("command", "python -m dlm_generation.benchmark")}` ({bench["device"]}, {bench["dtype"]},
{bench["machine"]["threads"]} thread(s); the first {bench["rows"][0]["problems"]} dev problems; `ar-kv-cache` is
`tiny-ar-chain-arith` through transformers' `generate` with its KV cache; `vs AR` is the speed relative to it in
the same run):

| config | gen | batch | accuracy | NFE | tok/fwd | tok/s | speedup vs vanilla | vs AR |
|---|---|---|---|---|---|---|---|---|
{bench_lines}
"""
    one, fast = rows["bd-one-token-sb8-g256"]["accuracy"], rows["bd-threshold-0.9-sb8-g256"]["accuracy"]
    left = rows.get("bd-left-to-right-g256", {}).get("accuracy")
    by = {(r["config"], r["gen_length"], r["batch_size"]): r for r in bench["rows"]}
    default_1 = [by[("model-default", g, 1)]["speedup_vs_ar"] for g in (256, 1024) if ("model-default", g, 1) in by]
    curve_tail = [100 * c["dev"]["one token per step"]["accuracy"] for c in log["curve"][-3:]]
    text += f"""
## Against the issue's targets

Issue 24 asked, on 200 dev problems at gen 256: one token per step at 97% or more (measured: **{100 * one:.1f}%**),
threshold 0.9 within a point of it ({100 * fast:.1f}%, {100 * (one - fast):.1f} points below), and at batch 1 faster than
the AR model through transformers' `generate` with its KV cache at equal accuracy (the shipped configuration:
{", ".join(f"{v:.2f}x" for v in default_1)} the AR model's speed at gen 256 / 1024, at lower accuracy). None is met
within the budget. What limits one token per step is what the weights know, not the order of commits: decoded
strictly left to right the same weights score {100 * left:.1f}% (the AR model they came from: 99.2%); the learning
curve has stayed near {min(curve_tail):.0f}-{max(curve_tail):.0f}% over its last
{log["curve"][-1]["step"] - log["curve"][-3]["step"]} steps; and the adaptation saw {log["step"] * run["batch_size"]:,}
samples (a few million tokens) where Fast-dLLM v2 adapts with about a billion. Threshold decoding loses more on top
because the commits are overconfident (the reliability diagram: {100 * accuracy["calibration"]["token_accuracy"]:.1f}%
of the tokens committed at threshold 0.9 are right, ECE {accuracy["calibration"]["ece"]:.3f}). The exact block cache
keeps the cost per generated token flat from gen 256 to 1024 (the tables above).
"""
    (folder / "README.md").write_text(text)
    print(f"wrote {folder / 'README.md'}")


if __name__ == "__main__":
    main()
