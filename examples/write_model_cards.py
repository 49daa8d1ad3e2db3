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
REPORTS = {"llada": ["llada_cpu_256_v2.json", "llada_cpu_issue25.json"],
           "dream": ["dream_cpu_256_v2.json", "dream_cpu_issue25.json"], "ar": ["llada_cpu_256_v2.json"]}

DECODE_STATES = (
    "the masked-diffusion loss on the states that semi-autoregressive decoding visits: each completion is padded "
    "with EOS to a canvas drawn log-uniformly from 64 to 1024 positions (EOS positions are trained targets, as in "
    "LLaDA's SFT), the prompt is never masked, and three rows in four are a *decode state* (a block length of "
    "8/16/32/64 and a block up to the one after the first EOS; everything before the block clean, everything after it "
    "masked, inside it a clean left part or a random subset masked; loss on the block's masked positions: the first, "
    "the decoding frontier, with weight 1, those after it with weight {lookahead}; in a share {hard} of the decode "
    "states the block is the one holding a computed digit, a result or the answer, which is masked and weighs 1), "
    "the fourth uniformly masked over the whole canvas (ratio t ~ U(0, 1); the EOS padding weighted as 16 tokens in "
    "all); a share {short} of the steps draw their canvas from 64-128 positions instead (more rows per step)"
)

# How the diffusion models got here (the first generation's objective, what changed and what it moved), and the
# commands that retrain them; the same for both cards, which state their own numbers above it.
HISTORY = """
## Training history

The first diffusion models were trained with `train_chain_arith.py`'s uniform-mask objective (commit a7bbd35) on
canvases of about 64 positions and fell apart on long canvases (LLaDA / Dream, 200 dev problems: 30.5% / 39.0% one
token per step at gen 256, 6.0% / 11.5% with threshold 0.9). The objective described above trains on the states
decoding visits instead. Its two additions, computed-digit decode states (`--hard-prob 0.5`: where the first
models' errors were, wrong tens digits of results, carries and borrows, with the format always right) and short
canvases (`--short-canvas-prob 0.5`: more decode states per step), moved the Dream from 47.5% to 90.5% (threshold
0.9: 38.5% to 83.5%) and the LLaDA from 40.0% to 93.5% (threshold 0.9: 85.5%) at block 32.

## Retrain

CPU, float32, seeded; each command resumes where the last one stopped (in chunks of `--minutes`), and `--export`
writes the folder. The whole lineage, from the repository root:

```bash
python examples/build_chain_arith_tokenizer.py
python examples/train_chain_arith.py --kind ar --out runs/ar --steps 3000 --threads 2
python examples/train_chain_arith.py --kind ar --out runs/ar --export model_cards/tiny-ar-chain-arith
# the Dream: dream3 (31 min), then dream5 from it (115 min, shipped at step 3200 of 4000)
python examples/train_chain_arith.py --kind dream --out runs/dream3 --init-from model_cards/tiny-dream-chain-arith \\
    --steps 3000 --lr 3e-4 --min-lr 3e-5 --warmup 100 --lookahead-weight 0.2 --eval-every 400 --eval-problems 100 \\
    --skip-initial-eval --threads 1
python examples/train_chain_arith.py --kind dream --out runs/dream5 --init-from model_cards/tiny-dream-chain-arith \\
    --steps 4000 --lr 3e-4 --min-lr 3e-5 --warmup 100 --lookahead-weight 0.2 --hard-prob 0.5 --short-canvas-prob 0.5 \\
    --eval-every 400 --eval-problems 100 --skip-initial-eval --threads 1
python examples/train_chain_arith.py --kind dream --out runs/dream5 ... --export model_cards/tiny-dream-chain-arith
# the LLaDA, from the shipped Dream (106 min)
python examples/train_chain_arith.py --kind llada --out runs/llada7 --init-from model_cards/tiny-dream-chain-arith \\
    --qkv-bias --extra-layers 1 --steps 2500 --lr 3e-4 --min-lr 3e-5 --warmup 50 --lookahead-weight 0.2 \\
    --hard-prob 0.5 --short-canvas-prob 0.5 --eval-every 500 --eval-problems 100 --skip-initial-eval --threads 1
python examples/train_chain_arith.py --kind llada --out runs/llada7 ... --export model_cards/tiny-llada-chain-arith
# each diffusion card's accuracy table and calibration picture, then the cards
python examples/evaluate_chain_arith.py model_cards/tiny-llada-chain-arith --problems 200 --calibration \\
    --json model_cards/tiny-llada-chain-arith/accuracy.json
python examples/write_model_cards.py
```
"""

MODELS = {
    "tiny-llada-chain-arith": dict(
        arch="LLaDA architecture (`LLaDAModelLM`, bidirectional Llama-style blocks, unshifted logits)",
        objective=DECODE_STATES + "; LLaDA's logits are unshifted (position i predicts token i)",
        family="llada",
        init=("the shipped tiny-dream-chain-arith (step 3200 of its run) renamed to LLaDA's parameter names "
              "(LLaDA's optional q/k/v biases hold Qwen2's) plus one block on top initialised as an exact "
              "one-position shift of the residual stream (positional attention to the previous position, identity "
              "values, MLP off), so that LLaDA's unshifted head started out reading the features Dream's shifted "
              "head read"),
    ),
    "tiny-dream-chain-arith": dict(
        arch="Dream architecture (`DreamModel`, bidirectional Qwen2 blocks, logits shifted by one)",
        objective=DECODE_STATES + "; Dream's logits are shifted (position i-1 predicts token i), so the AR "
                  "model's next-token head is reused as is",
        family="dream",
        init=("the previous tiny-dream-chain-arith (31 minutes of this objective without computed-digit states or "
              "short canvases), itself from the first tiny-dream-chain-arith (108 minutes of the shifted "
              "masked-diffusion loss with uniform masks on canvases of about 64 positions), initialised from "
              "tiny-ar-chain-arith (Dream keeps Qwen2's parameter names, so the AR weights load as is)"),
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
    return evaluate(model, tokenizer, "ar", list(dev_split()), gen_length=64, block_length=64)["vanilla"]


def lineage_minutes(log: dict, name: str) -> dict[str, float]:
    """Training minutes of every model a run's weights came from, nearest first (from the logs recorded at export;
    an earlier version of the same card is named as such)."""
    minutes, source, seen = {}, log.get("initialised_from"), {}
    while source:
        model = source["model"]
        seen[model] = seen.get(model, 0) + 1
        if model == name:
            label = f"an earlier {name}" if seen[model] == 1 else f"an earlier {name} ({seen[model]})"
        else:
            label = model if seen[model] == 1 else f"{model} (earlier version {seen[model] - 1})"
        minutes[label] = source["train_seconds"] / 60
        source = source.get("initialised_from")
    return minutes


def evaluation(entry: dict, is_ar: bool) -> str:
    """How a learning-curve point was decoded."""
    if is_ar:
        return "greedy"
    metric = entry["eval"]
    decoding = metric["decoding"]
    alg = f", alg {decoding['alg']}" if decoding.get("alg") else ""
    early = ", early stop" if "selection" in metric and not is_ar else ""
    return (f"gen {metric['gen_length']}, block {metric['block_length']}, {decoding.get('schedule', 'linear')} "
            f"schedule{alg}{early}")


def curve_points(curve: list[dict], is_ar: bool) -> dict[str, list[tuple[int, float]]]:
    """(step, accuracy) series of a learning curve, one per decoding and evaluation setting."""
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in curve:
        setting = evaluation(entry, is_ar)
        for decoding, value in (entry.get("dev_accuracies") or {"vanilla": entry["dev_accuracy"]}).items():
            label = setting if is_ar else f"{decoding} ({setting})"
            series.setdefault(label, []).append((entry["step"], value))
    return series


def plot_calibration(report: dict, path: Path, name: str) -> None:
    """Reliability diagram: per confidence bin, the share of committed tokens that were correct."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in report["bins"] if b["count"]]
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=[b["high"] - b["low"] for b in bins],
           align="edge", alpha=0.7, edgecolor="black", label="share correct")
    ax.plot([b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="black",
            label="(mean confidence, share correct)")
    ax.set_ylabel("share of committed tokens correct")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{name}: threshold 0.9, gen {report['gen_length']}, block 32\n"
                 f"{report['tokens']:,} committed tokens of {report['problems']} problems, ECE {report['ece']:.3f}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    counts.bar([b["low"] for b in bins], [b["count"] for b in bins], width=[b["high"] - b["low"] for b in bins],
               align="edge", color="gray", edgecolor="black")
    counts.set_yscale("log")
    counts.set_ylabel("tokens")
    counts.set_xlabel("confidence of the committed token")
    counts.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


ACCURACY_ROWS = {  # examples/evaluate_chain_arith.py rows -> how the card names them
    "vanilla-b32-g256": "vanilla, block 32, gen 256",
    "vanilla-b32-g1024": "vanilla, block 32, gen 1024",
    "threshold-b32-g256": "threshold 0.9, block 32, gen 256",
    "prefix-threshold-b32-g256": "threshold 0.9 + prefix cache, block 32, gen 256",
    "dual-threshold-b32-g256": "threshold 0.9 + dual cache, block 32, gen 256",
    "vanilla-b8-g256": "vanilla, block 8, gen 256",
    "threshold-b8-g256": "threshold 0.9, block 8, gen 256",
    "dual-threshold-b8-g256": "threshold 0.9 + dual cache, block 8, gen 256",
    "vanilla-1block-g256": "vanilla, one block, gen 256",
    "dllm-b32-g256": "vanilla + dLLM-Cache (kp 50, kr 2, rou 0.25), block 32, gen 256",
    "dllm-threshold-b32-g256": "threshold 0.9 + dLLM-Cache, block 32, gen 256",
    "d2cache-1block-g256": "d2Cache with its certainty prior, one block, gen 256",
    "d2cache-threshold-b32-g256": "threshold 0.9 + d2Cache (no prior), block 32, gen 256",
    "dual-threshold-pd0.03-b32-g256": "threshold 0.9 + dual cache + position decay 0.03, block 32, gen 256",
    "dual-threshold-pd0.03-dpad32-b32-g256": "the same + suffix window 32, block 32, gen 256",
    "dual-threshold-pd0.03-dpad32-b32-g1024": "the same + suffix window 32, block 32, gen 1024",
    "dual-threshold0.8-pd0.03-dpad32-b32-g256": "threshold 0.8 + dual + decay 0.03 + suffix window 32, gen 256",
    "dual-threshold0.8-pd0.03-dpad32-b32-g1024": "threshold 0.8 + dual + decay 0.03 + suffix window 32, gen 1024",
    "dual-threshold0.7-pd0.05-dpad32-b32-g256": "threshold 0.7 + dual + decay 0.05 + suffix window 32, gen 256",
    "dual-threshold0.7-pd0.05-dpad32-b32-g1024": "threshold 0.7 + dual + decay 0.05 + suffix window 32, gen 1024",
    "dual-eb0.03-b32-g256": "entropy bound 0.03 + dual cache, block 32, gen 256",
    "elastic-threshold-b32-g256": "threshold 0.9 + Elastic-Cache, block 32, gen 256",
}


SHIPPED = {  # the shipped generation_config.json in words (examples/train_chain_arith.py RECOMMENDED)
    "tiny-llada-chain-arith": "threshold 0.7 with the dual KV cache at block 32, position decay 0.05, a suffix window "
                              "of 32 and the lossless early stop",
    "tiny-dream-chain-arith": "threshold 0.8 with the dual KV cache at block 32, position decay 0.03, a suffix window "
                              "of 32 and the lossless early stop",
}


def accuracy_table(report: dict) -> str:
    lines = ["| decoding (early stop on) | problems | accuracy | forwards per batch |", "|---|---|---|---|"]
    for key, label in ACCURACY_ROWS.items():
        row = report["rows"].get(key)
        if row:
            lines.append(f"| {label} | {row['problems']} | {100 * row['accuracy']:.1f}% | {row['nfe']:.0f} |")
    return "\n".join(lines)


def plot_curve(curve: list[dict], path: Path, name: str, is_ar: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in curve_points(curve, is_ar).items():
        ax.plot([step for step, _ in points], [100 * value for _, value in points], "o-", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{name}: learning curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def benchmark_table(rows: list[dict], baseline: str = "vanilla") -> str:
    lines = ["| config | gen length | batch | accuracy | NFE | tokens/forward | tokens/s | speedup vs " + baseline + " |",
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
    earlier = lineage_minutes(log, name) if args.get("init_from") else {}
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
    if "tokens_per_step" in args:
        data = (f"{log['step']:,} steps of about {args['tokens_per_step']:,} tokens (a step's rows share one canvas "
                f"length, so long canvases come in few rows)")
    else:
        data = (f"{log['step'] * args['batch_size']:,} sequences ({log['step']} steps of {args['batch_size']}); "
                "problems bucketed by length in pools of 16 batches")
    load = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("model_cards/{name}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("model_cards/{name}")\n'
        'prompt = "Question: Start with 63. Subtract 39. Add 46. What is the result?\\nAnswer:"\n'
        "ids = tokenizer(prompt, return_tensors=\"pt\").input_ids\n"
    )
    load += ("out = model.generate(ids, max_new_tokens=64, do_sample=False)\n" if is_ar else
             "out = model.diffusion_generate(ids)  # the shipped generation_config.json\n")
    load += "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))"
    if not is_ar:
        load = "import dlm_generation  # registers the architecture (this folder holds no code)\n" + load
    curve_lines = "\n".join(
        f"| {c['step']} | {c['train_minutes']:.0f} | {'-' if c['loss'] is None else format(c['loss'], '.4f')} | "
        + ", ".join(f"{k} {100 * v:.1f}%".strip() for k, v in (c.get("dev_accuracies") or {"": c["dev_accuracy"]}).items())
        + f" | {evaluation(c, is_ar)} |" for c in curve
    )
    plot_curve(curve, folder / "learning_curve.png", name, is_ar)
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
{"" if is_ar else "`generation_config.json` holds the fastest configuration measured within one point of vanilla accuracy (block 32, gen 256 and 1024): " + SHIPPED[name] + " (see Accuracy)."}

## Training

- Objective: {info["objective"].format(lookahead=args.get("lookahead_weight", 1.0), hard=args.get("hard_prob", 0.0),
                                          short=args.get("short_canvas_prob", 0.0))}.{init}
- Data: the chain-arith train stream (`dlm_generation.tasks.train_problems`, seeds 10^9 + i, dev problems
  excluded), {data}.
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
    accuracy_path = folder / "accuracy.json"
    if not is_ar and accuracy_path.exists():
        accuracy_report = json.loads(accuracy_path.read_text())
        text += f"""
## Accuracy

Chain-arith dev (the first {accuracy_report["problems"]} problems unless the table says otherwise), greedy, one
token per step unless the row commits more, with the lossless `eos_early_stop=True`; measured by
`python examples/evaluate_chain_arith.py model_cards/{name} --problems {accuracy_report["problems"]} --calibration
--json model_cards/{name}/accuracy.json` ({accuracy_report["machine"]}):

{accuracy_table(accuracy_report)}
"""
        if "calibration" in accuracy_report:
            plot_calibration(accuracy_report["calibration"], folder / "calibration.png", name)
            cal = accuracy_report["calibration"]
            text += f"""
Calibration of Fast-dLLM threshold 0.9 decoding (block 32, gen 256): every token it committed up to the first
EOS, binned by the confidence it was committed with, against the share equal to the reference token at that
position ({cal["tokens"]:,} tokens, {100 * cal["token_accuracy"]:.1f}% correct, expected calibration error
{cal["ece"]:.3f}). A well calibrated model keeps the bars on the diagonal: what it commits at 0.9 or more is right
at least 90% of the time, which is what makes threshold decoding safe.

![reliability diagram](calibration.png) ![learning curve](learning_curve.png)
"""
    if is_ar:
        accuracy = ar_dev_accuracy(folder)
        text += f"""
## Evaluation

Greedy decoding (`generate`, KV cache) on the whole chain-arith dev split (500 problems), CPU float32:
**{100 * accuracy:.1f}%** correct final answers.
"""
    if not is_ar:
        text += HISTORY
    if not reports and not is_ar:
        text += """
## Speed

The speed tables in the project README (Benchmarks) were measured on this model's previous weights (the same
architecture, so the same cost per forward; forwards per call and accuracy differ) and are not rerun yet for these.
"""
    if reports:
        text += "\n## Benchmark\n" if is_ar else "\n## Speed\n"
    for report in reports:
        rows = [r for r in report["rows"] if (r["config"] == "ar-kv-cache") == is_ar]
        if rows:
            text += f"""
Chain-arith dev, first {rows[0]["problems"]} problems, generation length {" and ".join(str(g) for g in dict.fromkeys(r["gen_length"] for r in rows))}, batch
{" and ".join(str(b) for b in dict.fromkeys(r["batch_size"] for r in rows))}.
Measured with `{report.get("command", "python -m dlm_generation.benchmark")}` ({report["device"]}, {report["dtype"]},
{report["machine"]["threads"]} threads; speedups are wall-time ratios to {report.get("baseline", "vanilla")} diffusion decoding of the
benchmark's diffusion model in the same run, median of {report["repeats"]}{"" if is_ar else "; every row at block " + str(report["block_length"]) + " except `model-default`, the shipped generation_config.json"}):

{benchmark_table(rows, report.get("baseline", "vanilla"))}
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
