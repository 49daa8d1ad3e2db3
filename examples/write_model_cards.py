"""Write the README.md model cards of the tiny chain-arith models from what was measured.

Reads each folder's `training_log.json` (written by `train_chain_arith.py --export`) and the benchmark reports
`benchmarks/{llada,dream}_cpu*.json` (written by `python -m dlm_generation.benchmark ... --json`), so the cards
always state the numbers of the shipped weights.

    python examples/write_model_cards.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "model_cards"
# The benchmark reports (python -m dlm_generation.benchmark ... --json); the AR baseline rows come from LLaDA's.
BENCHMARKS = ROOT / "benchmarks"
REPORTS = {"llada": ["llada_cpu.json", "llada_cpu_256.json"], "dream": ["dream_cpu.json"],
           "ar": ["llada_cpu.json", "llada_cpu_256.json"]}

MODELS = {
    "tiny-llada-chain-arith": dict(
        arch="LLaDA architecture (`LLaDAModelLM`, bidirectional Llama-style blocks, unshifted logits)",
        objective=(
            "LLaDA's SFT masked-diffusion objective: the prompt is never masked; the completion plus EOS padding "
            "(a canvas of at least 64 positions) is masked with probability t ~ U(0.001, 1) per row, and the loss is "
            "the cross-entropy on masked positions weighted 1/t, divided by the canvas length"
        ),
        family="llada",
        init=("the shipped tiny-dream-chain-arith weights (itself adapted from tiny-ar-chain-arith), renamed to "
              "LLaDA's parameter names (LLaDA's optional q/k/v biases hold Qwen2's), plus one block on top "
              "initialised as an exact one-position shift of the residual stream (positional attention to the "
              "previous position, identity values, MLP off), so that LLaDA's unshifted head starts out reading "
              "the features Dream's shifted head read; then trained further with LLaDA's own objective"),
        lineage=["tiny-dream-chain-arith", "tiny-ar-chain-arith"],
    ),
    "tiny-dream-chain-arith": dict(
        arch="Dream architecture (`DreamModel`, bidirectional Qwen2 blocks, logits shifted by one)",
        objective=(
            "the shifted masked-diffusion objective: as LLaDA's SFT loss (prompt never masked, masked completion "
            "tokens weighted 1/t), but the logits at position i-1 predict the masked token at position i, so the "
            "AR model's next-token head is reused as is"
        ),
        family="dream",
        init="the shipped tiny-ar-chain-arith weights (Dream keeps Qwen2's parameter names, so they load as is)",
        lineage=["tiny-ar-chain-arith"],
    ),
    "tiny-ar-chain-arith": dict(
        arch="causal LM (transformers' `Qwen2ForCausalLM`)",
        objective="next-token cross-entropy on the completion and its EOS (the prompt is not scored)",
        family="ar",
    ),
}


def parameter_count(folder: Path) -> int:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118 (safe_open is not a dict)


def ar_dev_accuracy(folder: Path) -> float:
    """Greedy accuracy on the whole dev split, with the training script's evaluation."""
    from train_chain_arith import (
        evaluate,  # examples/ is on sys.path when this script runs
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlm_generation.tasks import dev_split

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    return evaluate(model, tokenizer, "ar", list(dev_split()), gen_length=64, block_length=64)


def evaluation(entry: dict, is_ar: bool) -> str:
    """How a learning-curve point was decoded."""
    if is_ar:
        return "greedy"
    metric = entry["eval"]
    decoding = metric["decoding"]
    alg = f", alg {decoding['alg']}" if decoding.get("alg") else ""
    return f"block {metric['block_length']}, {decoding.get('schedule', 'linear')} schedule{alg}"


def plot_curve(curve: list[dict], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    series: dict[str, list[dict]] = {}
    for entry in curve:
        series.setdefault(evaluation(entry, "eval" not in entry), []).append(entry)
    for label, points in series.items():
        ax.plot([p["step"] for p in points], [100 * p["dev_accuracy"] for p in points], "o-", label=label)
    ax.set_xlabel("training step (batch 64)")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{name}: learning curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def benchmark_table(rows: list[dict]) -> str:
    lines = ["| config | gen length | batch | accuracy | NFE | tokens/forward | tokens/s | speedup vs vanilla |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['gen_length']} | {r['batch_size']} | {100 * r['accuracy']:.1f}% | "
                     f"{r['nfe']:.1f} | {r['tokens_per_forward']:.2f} | {r['tokens_per_second']:.0f} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines)


def card(name: str, info: dict, reports: list[dict]) -> str:
    folder = CARDS / name
    log = json.loads((folder / "training_log.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    args = log["args"]
    curve = log["curve"]
    params = parameter_count(folder)
    minutes = log["train_seconds"] / 60
    init = f" Initialised from {info['init']}." if args.get("init_from") else " Trained from scratch."
    earlier = {model: json.loads((CARDS / model / "training_log.json").read_text())["train_seconds"] / 60
               for model in info.get("lineage", [])}
    lineage = "".join(f" + {m:.0f} min for {model}" for model, m in earlier.items())
    total = (f" Counting the models it was initialised from: {minutes:.0f} min{lineage} ="
             f" **{minutes + sum(earlier.values()):.0f} minutes** in all." if earlier else "")
    invocations = log.get("invocations") or []
    chunk_lines = []
    for i, inv in enumerate(invocations):
        end = invocations[i + 1]["from_step"] if i + 1 < len(invocations) else log["step"]
        chunk_lines.append(
            f"  - steps {inv['from_step']}-{end}: peak learning rate {inv['lr']}, {inv['warmup']} warm-up steps, cosine"
            f" to {inv['min_lr']} at step {inv['steps']}, {inv['threads']} thread(s)"
        )
    chunks = "\n".join(chunk_lines)
    dims = (f"{args['layers'] + args.get('extra_layers', 0)} layers, hidden {args['hidden']}, {args['heads']} heads, MLP {args['ffn']}, "
            f"vocabulary {config.get('vocab_size', config.get('embedding_size'))}")
    is_ar = info["family"] == "ar"
    load = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("model_cards/{name}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("model_cards/{name}")\n'
        'prompt = "Question: Start with 63. Subtract 39. Add 46. What is the result?\\nAnswer:"\n'
        "ids = tokenizer(prompt, return_tensors=\"pt\").input_ids\n"
    )
    load += ("out = model.generate(ids, max_new_tokens=64, do_sample=False)\n" if is_ar else
             "out = model.diffusion_generate(ids, max_new_tokens=64)  # the shipped generation_config.json\n")
    load += "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))"
    if not is_ar:
        load = "import dlm_generation  # registers the architecture (this folder holds no code)\n" + load
    curve_lines = "\n".join(
        f"| {c['step']} | {c['train_minutes']:.0f} | {'-' if c['loss'] is None else format(c['loss'], '.4f')} | "
        f"{100 * c['dev_accuracy']:.1f}% | {evaluation(c, is_ar)} |" for c in curve
    )
    plot_curve(curve, folder / "learning_curve.png", name)
    text = f"""---
library_name: {"transformers" if is_ar else "dlm-generation"}
tags: [chain-arith, tiny, {"causal-lm" if is_ar else "diffusion-language-model"}]
license: apache-2.0
---
# {name}

A {params / 1e6:.2f}M-parameter {info["arch"]} trained on **chain-arith**, the offline benchmark task of
[dlm-generation](../../README.md): chained add/subtract word problems answered in GSM8K style (`#### N`), where
every step depends on the previous result. {dims}. It is small enough to run anywhere in seconds and trained
enough that accuracy/speed trade-offs of decoding methods are real.
{"It is the autoregressive baseline of the benchmark and the guide model for AR-guided diffusion." if is_ar else ""}

## Use

```python
{load}
```

The tokenizer (also in `model_cards/tiny-chain-arith-tokenizer`) is a byte-level BPE trained on chain-arith text
with every digit its own token; `<|pad|>` 0, `<|startoftext|>` 1 (BOS, added by the tokenizer),
`<|endoftext|>` 2 (EOS), `<|mdm_mask|>` 3. Its chat template turns a user question into the task prompt.
{"" if is_ar else "`generation_config.json` holds the recommended fast configuration (see the table below)."}

## Training

- Objective: {info["objective"]}.{init}
- Data: the chain-arith train stream (`dlm_generation.tasks.train_problems`, seeds 10^9 + i, dev problems
  excluded), {log["step"] * args["batch_size"]:,} sequences ({log["step"]} steps of {args["batch_size"]}); problems
  bucketed by length in pools of 16 batches.
- Optimiser: AdamW (betas 0.9/0.98, weight decay 0.1), gradient clipping 1.0, linear warm-up then cosine decay of
  the learning rate; trained in resumable chunks (the schedule horizon was set per chunk):
{chunks}
- Hardware and time: CPU (2 cores), float32; **{minutes:.0f} minutes** of training
  (evaluation excluded).{total} Shipped weights: step {log["best_step"]} (best dev accuracy during training).
- Reproduce: `python examples/train_chain_arith.py --kind {info["family"]} --out runs/{info["family"]} ...` with the
  arguments recorded in `training_log.json` (`args`, and per chunk `invocations`); the same command resumes.

Learning curve (dev accuracy on the first {curve[-1].get("eval", {}).get("problems", 200)} dev problems during
training; also in `training_log.json` and `learning_curve.png`):

| step | minutes | train loss | dev accuracy | decoding |
|---|---|---|---|---|
{curve_lines}
"""
    if is_ar:
        accuracy = ar_dev_accuracy(folder)
        text += f"""
## Evaluation

Greedy decoding (`generate`, KV cache) on the whole chain-arith dev split (500 problems), CPU float32:
**{100 * accuracy:.1f}%** correct final answers.
"""
    if reports:
        text += "\n## Benchmark\n" if is_ar else "\n## Evaluation\n"
    for report in reports:
        rows = [r for r in report["rows"] if (r["config"] == "ar-kv-cache") == is_ar]
        if rows:
            text += f"""
Chain-arith dev, first {rows[0]["problems"]} problems, generation length {rows[0]["gen_length"]}, batch
{rows[0]["batch_size"]}.
Measured with `{report.get("command", "python -m dlm_generation.benchmark")}` ({report["device"]}, {report["dtype"]},
{report["machine"]["threads"]} threads; speedups are wall-time ratios to vanilla diffusion decoding of the
benchmark's diffusion model in the same run, median of {report["repeats"]}):

{benchmark_table(rows)}
"""
    return text


def main() -> None:
    for name, info in MODELS.items():
        folder = CARDS / name
        if not (folder / "training_log.json").exists():
            print(f"skip {name}: no training_log.json")
            continue
        reports = [json.loads((BENCHMARKS / f).read_text()) for f in REPORTS[info["family"]]
                   if (BENCHMARKS / f).exists()]
        (folder / "README.md").write_text(card(name, info, reports))
        print(f"wrote {folder / 'README.md'}")


if __name__ == "__main__":
    main()
