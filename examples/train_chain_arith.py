"""Train the tiny chain-arith models shipped in model_cards/ (CPU, float32, seeded, resumable).

Three kinds, one script:

* ``--kind ar``: a Qwen2 causal LM (transformers' own class), next-token loss on the completion and its EOS.
  The autoregressive baseline and the guide model for AR-guided diffusion.
* ``--kind dream``: the Dream architecture (bidirectional Qwen2) initialised from an AR checkpoint and adapted with
  the *shifted* masked-diffusion objective: the logits at position i-1 predict the masked token at position i
  (how Dream-7B was made from Qwen2.5-7B).
* ``--kind llada``: the LLaDA architecture with the unshifted masked-diffusion objective (the logits at a masked
  position predict its own token); from scratch, or with ``--init-from`` from a Qwen2 AR or a Dream model (same
  parameter names; folder or run checkpoint) plus ``--extra-layers`` blocks on top, initialised as a one-position
  shift so that the unshifted head starts out reading the source's next-token features (`init_shift_block`).

Masked-diffusion objective, on the states decoding visits (`decode_state_mask`): the prompt is never masked; the
completion is padded with EOS to a canvas drawn log-uniformly from ``--canvas-min`` to ``--canvas-max`` positions
(the EOS positions are trained targets, as in LLaDA's SFT, so long canvases work); a step holds about
``--tokens-per-step`` tokens. A share ``--block-prob`` of rows is a semi-autoregressive decode state (clean
prefix, a partly masked block, fully masked suffix; loss on the block), the rest uniform masking over the canvas.

Resumable: a checkpoint (model, optimizer, step, elapsed time, learning curve) is written to ``--out`` every
``--save-minutes`` and when the time budget (``--minutes``) runs out or the process gets SIGTERM; running the
same command again continues from it. The data order depends only on the step number, so a resumed run sees
exactly the batches an uninterrupted run would. ``--export FOLDER`` writes the best checkpoint (by dev accuracy
on the first ``--eval-problems`` dev problems at ``--eval-gen-length`` / ``--eval-block-length``: greedy for the AR
model; for diffusion models the worse of vanilla and threshold-0.9 decoding, both with the lossless early stop) as
a Hugging Face model folder without code files (load it with the package installed).

    python examples/train_chain_arith.py --kind ar --out runs/ar --minutes 60          # train (resumes)
    python examples/train_chain_arith.py --kind ar --out runs/ar --export model_cards/tiny-ar-chain-arith
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from dlm_generation import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
from dlm_generation.benchmark import BASE_CONFIG, solve
from dlm_generation.hub import save_without_code
from dlm_generation.tasks.chain_arith import accuracy, dev_split, train_problems
from dlm_generation.training import (  # noqa: F401  (BLOCK_LENGTHS, PAD_WEIGHT, ...: the tests read them here)
    BLOCK_LENGTHS,
    BLOCK_WEIGHTS,
    PAD_WEIGHT,
    decode_state_mask,
    masked_diffusion_loss,
    result_positions,
    warmup_cosine_lr,
)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "model_cards" / "tiny-chain-arith-tokenizer"
POOL_BATCHES = 16  # batches drawn together and bucketed by length (less padding)
# Arguments that define a run's data and model; resuming with other values is refused.
RUN_DEFINING = ("kind", "batch_size", "tokens_per_step", "canvas_min", "canvas_max", "block_prob", "lookahead_weight",
                "hard_prob", "short_canvas_prob", "seed", "hidden",
                "layers", "heads", "ffn", "qkv_bias", "init_from", "extra_layers")


def model_config(kind: str, args: argparse.Namespace, tokenizer) -> object:
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    vocab = 64 * math.ceil(len(tokenizer) / 64)
    if kind == "ar":
        return Qwen2Config(
            vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.heads, intermediate_size=args.ffn, max_position_embeddings=4096,
            rope_theta=10000.0, tie_word_embeddings=False, **special,
        )
    if kind == "dream":
        return DreamConfig(
            vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.heads, intermediate_size=args.ffn, max_position_embeddings=4096,
            max_window_layers=args.layers, rope_theta=10000.0, tie_word_embeddings=False,
            mask_token_id=tokenizer.mask_token_id, **special,
        )
    return LLaDAConfig(
        d_model=args.hidden, n_heads=args.heads, n_kv_heads=args.heads, n_layers=args.layers + args.extra_layers,
        mlp_hidden_size=args.ffn, vocab_size=vocab, embedding_size=vocab, max_sequence_length=4096,
        rope_theta=10000.0, rms_norm_eps=1e-6, include_qkv_bias=args.qkv_bias, weight_tying=False,
        mask_token_id=tokenizer.mask_token_id, **special,
    )


def build_model(kind: str, args: argparse.Namespace, tokenizer, fresh: bool = True) -> torch.nn.Module:
    config = model_config(kind, args, tokenizer)
    torch.manual_seed(args.seed)
    model = {"ar": Qwen2ForCausalLM, "dream": DreamModel, "llada": LLaDAModelLM}[kind](config)
    if args.init_from and fresh:
        load_ar_weights(model, kind, Path(args.init_from), tokenizer)
    return model


def source_state_dict(source: Path) -> dict[str, torch.Tensor]:
    """The weights of a Qwen2 or Dream model: an HF folder (model.safetensors) or a run's .pt checkpoint."""
    if source.is_dir():
        return load_file(source / "model.safetensors")
    saved = torch.load(source, weights_only=False)
    return saved["model"] if "model" in saved else saved


def load_ar_weights(model: torch.nn.Module, kind: str, source: Path, tokenizer) -> None:
    """Copy a Qwen2 AR model (or a Dream model, same names) into `model`: same names for Dream, renamed for LLaDA
    (a LLaDA source loads as it is, to continue training an earlier LLaDA).

    The first LLaDA block beyond the source's depth (``--extra-layers``) starts as a one-position shift (see
    `init_shift_block`), so that the unshifted LLaDA head reads at position i what the source's head read at i-1;
    further extra blocks start as the identity (zero output projections).
    """
    ar = source_state_dict(source)
    if kind == "llada" and not any(name.startswith("model.transformer.") for name in ar):  # Qwen2/Dream names
        renames = {"model.embed_tokens": "model.transformer.wte", "model.norm": "model.transformer.ln_f",
                   "lm_head": "model.transformer.ff_out"}
        layer = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
                 "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
                 "mlp.down_proj": "ff_out", "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm"}
        mapped = {}
        for name, tensor in ar.items():
            stem, leaf = name.rsplit(".", 1)
            if stem in renames:
                mapped[f"{renames[stem]}.{leaf}"] = tensor
            else:
                _, _, index, rest = stem.split(".", 3)
                mapped[f"model.transformer.blocks.{index}.{layer[rest]}.{leaf}"] = tensor
        ar = mapped
    missing, unexpected = model.load_state_dict(ar, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if kind == "llada":
        blocks = model.model.transformer.blocks
        ar_depth = 1 + max(int(name.split(".")[3]) for name in ar if name.startswith("model.transformer.blocks."))
        if ar_depth < len(blocks):  # the first extra block shifts; any further ones start as the identity
            init_shift_block(blocks[ar_depth], model.config.rope_theta, final_hidden_rms(model, tokenizer, ar_depth))
            for block in blocks[ar_depth + 1:]:
                with torch.no_grad():
                    block.attn_out.weight.zero_()
                    block.ff_out.weight.zero_()
        missing = [m for m in missing if not any(m.startswith(f"model.transformer.blocks.{i}.")
                                                 for i in range(ar_depth, len(blocks)))]
    if missing or unexpected:
        raise RuntimeError(f"AR weights do not fit the {kind} model: missing {missing}, unexpected {unexpected}")


@torch.no_grad()
def final_hidden_rms(model, tokenizer, depth: int) -> float:
    """Typical RMS of the residual stream after the first `depth` LLaDA blocks, on a half-masked training batch."""
    problems = batch_problems(0, 16)
    prompts, completions = encode(problems, tokenizer)
    seen = []
    hook = model.model.transformer.blocks[depth - 1].register_forward_hook(
        lambda module, inputs, output: seen.append(output.pow(2).mean(-1).sqrt()))
    try:
        for p, c in zip(prompts, completions):
            ids = torch.tensor([p + [tokenizer.mask_token_id if i % 2 else t for i, t in enumerate(c)]])
            model(input_ids=ids)
    finally:
        hook.remove()
    return torch.cat([s.flatten() for s in seen]).median().item()


def init_shift_block(block, rope_theta: float, hidden_rms: float, frequencies: int = 8) -> None:
    """Initialise an appended LLaDA block as a one-position right shift of the residual stream.

    Attention is made purely positional: q and k are constant biases whose rotary phases line up only for the key
    one position before the query (score A * sum_j cos(theta_j * (m - n - 1)) over the `frequencies` fastest
    rotary frequencies; A makes the next-best position ~30 logits worse), values are the identity, and the
    output projection scales the copied, RMS-normalised state of position i-1 to 100x the typical state at i.
    The final RMSNorm is scale-invariant, so the head at i then reads (to ~1%) the features of position i-1: the
    next-token features of an AR or Dream model, which LLaDA's unshifted head needs at the masked position
    itself. The MLP starts switched off (zero output projection). Everything stays trainable.
    """
    head_dim, half = block.head_dim, block.head_dim // 2
    theta = rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    gap = frequencies - torch.cos(theta[:frequencies]).sum().item()  # score drop one position away, per unit A
    amplitude = 30.0 * math.sqrt(head_dim) / gap
    q_head, k_head = torch.zeros(head_dim, dtype=torch.float64), torch.zeros(head_dim, dtype=torch.float64)
    q_head[:frequencies] = amplitude * torch.cos(theta[:frequencies])
    q_head[half:half + frequencies] = -amplitude * torch.sin(theta[:frequencies])
    k_head[:frequencies] = 1.0
    d_model = block.attn_out.weight.shape[0]
    with torch.no_grad():
        block.attn_norm.weight.fill_(1.0)
        block.q_proj.weight.zero_()
        block.q_proj.bias.copy_(q_head.repeat(block.n_heads).float())
        block.k_proj.weight.zero_()
        block.k_proj.bias.copy_(k_head.repeat(block.n_kv_heads).float())
        block.v_proj.weight.copy_(torch.eye(d_model))
        block.v_proj.bias.zero_()
        block.attn_out.weight.copy_(100.0 * hidden_rms * torch.eye(d_model))
        block.ff_out.weight.zero_()


# ----------------------------------------------------------------------------------------------------------- data
@lru_cache(maxsize=1)
def _pool(pool_index: int, batch_size: int) -> list[list]:
    per_pool = POOL_BATCHES * batch_size
    problems = train_problems(pool_index * per_pool, (pool_index + 1) * per_pool)
    problems.sort(key=lambda p: (len(p.prompt) + len(p.completion)))
    size = math.ceil(len(problems) / POOL_BATCHES)
    chunks = [problems[i * size:(i + 1) * size] for i in range(POOL_BATCHES)]
    random.Random(pool_index).shuffle(chunks)
    return chunks


def batch_problems(step: int, batch_size: int) -> list:
    """The problems of training step `step`: pools of POOL_BATCHES batches, sorted by length, order seeded."""
    pool_index, slot = divmod(step, POOL_BATCHES)
    return _pool(pool_index, batch_size)[slot]


def encode(problems: list, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    prompts = tokenizer([p.prompt for p in problems]).input_ids  # BOS + prompt
    completions = tokenizer([p.completion for p in problems], add_special_tokens=False).input_ids
    return prompts, [c + [tokenizer.eos_token_id] for c in completions]


def ar_loss(model, problems, tokenizer) -> torch.Tensor:
    prompts, completions = encode(problems, tokenizer)
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(problems), length), tokenizer.pad_token_id)
    labels = torch.full((len(problems), length), -100)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        ids[row, : len(p) + len(c)] = torch.tensor(p + c)
        labels[row, len(p) : len(p) + len(c)] = torch.tensor(c)
    logits = model(input_ids=ids).logits[:, :-1]  # right padding never reaches earlier positions (causal)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


PROBLEMS_PER_STEP = 256  # problem indices reserved per step (a step uses as many as its canvas length allows)


def diffusion_batch(step: int, args: argparse.Namespace) -> tuple[list, int]:
    """The problems and canvas length of diffusion training step `step` (deterministic in the step).

    The canvas (completion + EOS padding) is drawn log-uniformly from [--canvas-min, --canvas-max] (a multiple of
    8), or with probability --short-canvas-prob uniformly from [--canvas-min, 2 * --canvas-min], and the number of rows keeps about --tokens-per-step tokens per step, so long canvases get few rows.
    """
    rng = random.Random(args.seed * 10**7 + step)
    canvas = 8 * round(math.exp(rng.uniform(math.log(args.canvas_min), math.log(args.canvas_max))) / 8)
    if args.short_canvas_prob and rng.random() < args.short_canvas_prob:  # many rows: many decode states per step
        canvas = 8 * rng.randint(args.canvas_min // 8, max(args.canvas_min // 8, 2 * args.canvas_min // 8))
    rows = max(2, min(PROBLEMS_PER_STEP, args.tokens_per_step // (canvas + 40)))
    return train_problems(step * PROBLEMS_PER_STEP, step * PROBLEMS_PER_STEP + rows), canvas


def mdm_loss(model, problems, tokenizer, kind: str, canvas: int, seed: int, block_prob: float,
             lookahead_weight: float = 1.0, hard_prob: float = 0.0) -> torch.Tensor:
    """`dlm_generation.training.masked_diffusion_loss` on chain-arith problems (`kind` is implied by the model)."""
    prompts, completions = encode(problems, tokenizer)
    return masked_diffusion_loss(model, prompts, completions, tokenizer, canvas, seed, block_prob, lookahead_weight,
                                 hard_prob)


# ----------------------------------------------------------------------------------------------------------- eval
# How training evaluates diffusion models: vanilla (one token per step) and Fast-dLLM threshold 0.9, both with the
# lossless early stop (the text up to the first EOS is what a run without it writes, in fewer forwards).
EVAL_DECODINGS = {"vanilla": {"eos_early_stop": True},
                  "threshold": {"alg": "low_confidence", "threshold": 0.9, "eos_early_stop": True}}
# Also recorded, not selected on: strictly left-to-right decoding (blocks of one position), the model's accuracy
# on the states an autoregressive model sees (clean prefix, masked suffix); it bounds what the other orders reach.
DIAGNOSTIC_DECODINGS = {"left-to-right": {"block_length": 1, "eos_early_stop": True}}


@torch.no_grad()
def evaluate(model, tokenizer, kind: str, problems, gen_length: int, block_length: int,
             batch_size: int = 50) -> dict[str, float]:
    """Dev accuracy per decoding: greedy AR generate, or each of EVAL_DECODINGS for diffusion models."""
    model.eval()
    results = {}
    if kind == "ar":
        completions = solve(model, tokenizer, problems, gen_length, batch_size, autoregressive=True).completions
        results["vanilla"] = accuracy(completions, problems)
    else:
        for name, extra in {**EVAL_DECODINGS, **DIAGNOSTIC_DECODINGS}.items():
            settings = {**BASE_CONFIG, "steps": gen_length, "block_length": block_length, **extra}
            completions = solve(model, tokenizer, problems, gen_length, batch_size, settings).completions
            results[name] = accuracy(completions, problems)
    model.train()
    return results


# ------------------------------------------------------------------------------------------------------ training
def learning_rate(step: int, args: argparse.Namespace) -> float:
    return warmup_cosine_lr(step, args.lr, args.min_lr, args.warmup, args.steps)


# The shipped generation_config.json of each model (README "The chain-arith models"); a guidance= call drops the
# inherited threshold.
RECOMMENDED = {
    "ar": {"max_new_tokens": 64, "do_sample": False},
    # the fastest configuration measured within a point of vanilla (one token per step, block 32) on 200 dev problems
    # at gen 256 and 1024 (issue 25): Fast-dLLM's threshold with the dual KV cache at block 32, PC-Sampler's
    # position decay and DPad's suffix window of 32 (LLaDA threshold 0.7, decay 0.05: 93.5% vs 93.5%; Dream threshold
    # 0.8, decay 0.03: 93.5% vs 90.5%; docs/decoding.md has the table). Issue 9 shipped threshold 0.9 at block 8.
    "llada": {"max_new_tokens": 256, "steps": 256, "block_length": 32, "alg": "low_confidence", "threshold": 0.7,
              "position_decay": 0.05, "suffix_window": 32, "cache_implementation": "dual", "eos_early_stop": True,
              "temperature": 0.0},
    "dream": {"max_new_tokens": 256, "steps": 256, "block_length": 32, "alg": "low_confidence", "threshold": 0.8,
              "position_decay": 0.03, "suffix_window": 32, "cache_implementation": "dual", "eos_early_stop": True,
              "temperature": 0.0, "schedule": "linear"},
}


def source_log(run: Path, init_from: str | None) -> dict | None:
    """The training log of the model folder a run was initialised from, without its curve (for a card's lineage:
    the training time of every model the weights came from). Read once and kept in the run folder, because an
    export may overwrite that folder."""
    kept = run / "source_log.json"
    if not kept.exists():
        log = folder_log(init_from)
        if log is None:
            return None
        kept.write_text(json.dumps(log, indent=1) + "\n")
    return json.loads(kept.read_text())


def folder_log(folder: str | None) -> dict | None:
    """A model folder's training log without its curve, with the logs of the folders it came from nested in
    "initialised_from" (read from those folders when the log predates that field)."""
    log_path = Path(folder) / "training_log.json" if folder else None
    if log_path is None or not log_path.exists():
        return None
    log = {k: v for k, v in json.loads(log_path.read_text()).items() if k != "curve"}
    if "initialised_from" not in log:
        log["initialised_from"] = folder_log(log["args"].get("init_from"))
    return {"model": Path(folder).name, **log}


def export(model, tokenizer, kind: str, folder: Path, state: dict, source: dict | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.generation_config.update(**RECOMMENDED[kind])
    model.generation_config._from_model_config = False  # a chosen configuration, not derived from config.json
    save_without_code(model, folder)  # the folder is loaded with the package installed
    tokenizer.save_pretrained(folder)
    summary = {k: state.get(k) for k in ("step", "train_seconds", "best_accuracy", "best_step", "best_metric", "curve",
                                          "invocations")}
    summary["args"] = state["args"]  # what defines the run (model, data); per-invocation settings in "invocations"
    summary["initialised_from"] = source  # the source model's own log (and so on down its lineage)
    (folder / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"exported step {state['best_step']} (dev accuracy {state['best_accuracy']:.3f}) to {folder}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["ar", "dream", "llada"], required=True)
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, log); resumes from it")
    parser.add_argument("--init-from", help="Qwen2 AR or Dream model (HF folder or run .pt) to initialise from")
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this invocation")
    parser.add_argument("--steps", type=int, default=20000, help="schedule length (cosine decay ends here)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--qkv-bias", action="store_true", help="LLaDA only: q/k/v biases (needed for AR init)")
    parser.add_argument("--extra-layers", type=int, default=0,
                        help="LLaDA only: blocks on top of --layers, initialised as a one-position shift (with"
                             " --init-from)")
    parser.add_argument("--tokens-per-step", type=int, default=6144,
                        help="diffusion: tokens per training step (rows = this / canvas length)")
    parser.add_argument("--canvas-min", type=int, default=64, help="diffusion: shortest EOS-padded canvas")
    parser.add_argument("--canvas-max", type=int, default=1024, help="diffusion: longest EOS-padded canvas")
    parser.add_argument("--block-prob", type=float, default=0.75,
                        help="diffusion: share of rows masked as a semi-AR decode state (the rest: uniform masks)")
    parser.add_argument("--lookahead-weight", type=float, default=1.0,
                        help="diffusion: loss weight of a decode state's masked positions after its first one (1)")
    parser.add_argument("--hard-prob", type=float, default=0.0,
                        help="diffusion: share of decode states whose frontier is a computed digit (a result or"
                             " the answer) rather than any position")
    parser.add_argument("--short-canvas-prob", type=float, default=0.0,
                        help="diffusion: share of steps whose canvas is drawn from [--canvas-min, 2 * --canvas-min]"
                             " (more rows, so more decode states, per step)")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--eval-gen-length", type=int, default=256)
    parser.add_argument("--eval-block-length", type=int, default=32)
    parser.add_argument("--skip-initial-eval", action="store_true",
                        help="with --init-from: do not evaluate the initial weights (long evaluations are slow)")
    parser.add_argument("--save-minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", type=Path, help="write the best checkpoint as an HF folder and exit")
    args = parser.parse_args(argv)
    if args.kind != "llada" and args.qkv_bias:
        parser.error("--qkv-bias applies to --kind llada only (Qwen2 and Dream always have q/k/v biases)")
    if args.kind == "ar" and args.init_from:
        parser.error("--init-from applies to diffusion models (dream, llada)")
    if args.extra_layers and args.kind != "llada":
        parser.error("--extra-layers applies to --kind llada only")
    if args.eval_gen_length % args.eval_block_length:
        parser.error(f"--eval-gen-length {args.eval_gen_length} must be a multiple of"
                     f" --eval-block-length {args.eval_block_length}")
    if not 8 <= args.canvas_min <= args.canvas_max:
        parser.error(f"need 8 <= --canvas-min <= --canvas-max, got {args.canvas_min} and {args.canvas_max}")
    if args.kind == "llada" and args.init_from and not args.qkv_bias:
        parser.error("initialising LLaDA from a Qwen2 AR model needs --qkv-bias (Qwen2 has q/k/v biases)")

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint_path, best_path = args.out / "checkpoint.pt", args.out / "best.pt"

    model = build_model(args.kind, args, tokenizer, fresh=not checkpoint_path.exists())
    source_log(args.out, args.init_from)  # keep the source's log before an export can overwrite its folder
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    state = {"step": 0, "train_seconds": 0.0, "best_accuracy": -1.0, "best_step": -1, "curve": [], "running": None,
             "args": {k: getattr(args, k) for k in RUN_DEFINING}}
    if checkpoint_path.exists():
        saved = torch.load(checkpoint_path, weights_only=False)
        recorded = saved["state"].get("args", {})
        changed = {k: (recorded[k], getattr(args, k)) for k in recorded if recorded[k] != getattr(args, k)}
        if changed and not args.export:
            sys.exit(f"{args.out} was trained with different settings {changed} (recorded, given); a resumed run"
                     " must see the same data and model: pass the recorded values or use a new --out")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = {**state, **saved["state"]}
        print(f"resumed from step {state['step']} ({state['train_seconds'] / 60:.1f} min trained)")

    # Best-checkpoint selection compares like with like: a changed evaluation starts the selection afresh.
    metric = {"problems": args.eval_problems, "gen_length": args.eval_gen_length,
              "block_length": args.eval_block_length,
              "decoding": {k: v for k, v in BASE_CONFIG.items() if v is not None},
              "selection": "greedy" if args.kind == "ar" else {"min over": EVAL_DECODINGS}}
    if not args.export and state.get("best_metric") != metric:
        if state["best_step"] >= 0:
            print(f"evaluation changed from {state.get('best_metric')} to {metric}: best checkpoint selection restarts")
        state["best_accuracy"], state["best_step"], state["best_metric"] = -1.0, -1, metric

    if args.export:
        if not best_path.exists():
            sys.exit(f"no best checkpoint in {args.out}: train first")
        model.load_state_dict(torch.load(best_path, weights_only=True))
        export(model, tokenizer, args.kind, args.export, state, source_log(args.out, args.init_from))
        return

    def save() -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state},
                   checkpoint_path.with_suffix(".tmp"))
        checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    dev = list(dev_split(args.eval_problems))
    started = last_save = time.time()
    # Each invocation's settings (schedule, learning rate, threads may change between chunks of a run).
    state.setdefault("invocations", []).append(
        {"from_step": state["step"], **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                        if k not in RUN_DEFINING and k not in ("export", "out")}}
    )
    def checkpoint_if_best() -> None:
        """Evaluate on the first dev problems; keep the weights in best.pt when they are the best so far."""
        results = evaluate(model, tokenizer, args.kind, dev, args.eval_gen_length, args.eval_block_length)
        score = min(results.get(name, results["vanilla"]) for name in EVAL_DECODINGS)  # the worse of the two
        loss = None if running is None else round(running, 5)
        state["curve"].append({"step": state["step"], "train_minutes": round(state["train_seconds"] / 60, 2),
                               "loss": loss, "dev_accuracy": results["vanilla"], "dev_accuracies": results,
                               "eval": metric})
        print(f"\nstep {state['step']}: loss {loss}, dev accuracy {results} "
              f"({state['train_seconds'] / 60:.1f} min)", flush=True)
        if score > state["best_accuracy"]:
            state["best_accuracy"], state["best_step"] = score, state["step"]
            torch.save(model.state_dict(), best_path.with_suffix(".tmp"))
            best_path.with_suffix(".tmp").replace(best_path)

    running = state["running"]
    if state["step"] == 0 and args.init_from and not args.skip_initial_eval:  # where the initialisation starts
        checkpoint_if_best()
    model.train()
    bar = tqdm(total=args.steps, initial=state["step"], desc=args.kind, mininterval=20, file=sys.stdout)
    while state["step"] < args.steps and not stop["now"] and time.time() - started < args.minutes * 60:
        step_start = time.process_time()  # CPU time: a paused (SIGSTOP) or preempted run does not count
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(state["step"], args)
        if args.kind == "ar":
            loss = ar_loss(model, batch_problems(state["step"], args.batch_size), tokenizer)
        else:
            problems, canvas = diffusion_batch(state["step"], args)
            loss = mdm_loss(model, problems, tokenizer, args.kind, canvas, args.seed * 10**7 + state["step"],
                            args.block_prob, args.lookahead_weight, args.hard_prob)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["train_seconds"] += (time.process_time() - step_start) / args.threads
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        state["running"] = running
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{learning_rate(state['step'], args):.2e}", refresh=False)
        if state["step"] % args.eval_every == 0 or state["step"] == args.steps:
            checkpoint_if_best()
            save()
            last_save = time.time()
        elif time.time() - last_save > args.save_minutes * 60:
            save()
            last_save = time.time()
    bar.close()
    save()
    print(f"stopped at step {state['step']} ({state['train_seconds'] / 60:.1f} min trained); "
          f"best dev accuracy {state['best_accuracy']:.3f} at step {state['best_step']}")


if __name__ == "__main__":
    main()
