"""Adapt the tiny chain-arith AR model (Qwen2) into a Fast-dLLM v2-style block-diffusion model (CPU, resumable).

Fast-dLLM v2's recipe (arXiv 2509.26328; NVlabs/Fast-dLLM `v2/`): the AR model keeps its architecture and weights
and learns `dlm_generation.training.block_diffusion_loss`: blocks of `--block-size` tokens, one masking rate per
block, the noisy sequence read beside the clean one under the block-diffusion attention mask, the complementary
mask as a second row, and the AR token shift (the logits at i - 1 predict token i). Each sample is the prompt
(never masked, not learned), the completion and its EOS (learned), padded with the mask token to a multiple of the
block size (not learned), as the paper's "+pad" variant does.

Evaluation during training decodes dev problems the way Fast-dLLM v2's `generate` does, without its KV cache
(`block_decode`): blocks in order, each block's sub-blocks of `--sub-block` positions in order, every step one
forward over the sequence so far under the block-causal mask, the logits shifted by one, committing the masked
positions of the sub-block whose confidence exceeds the threshold plus always the most confident one; stop once
an EOS is committed with no mask before it. "one token per step" is threshold 1 (only the most confident).

Resumable: `--out` holds `checkpoint.pt` (model, optimizer, step, learning curve), written every `--save-minutes`,
at the end of `--minutes` and on SIGTERM; the same command continues from it, with the batches an uninterrupted
run would see (the data order depends only on the step). A session that ends with its machine keeps a smaller
snapshot in the repository: `--snapshot DIR` also writes the current weights (safetensors) and the run state there
when an invocation stops; a run folder without `checkpoint.pt` resumes from that snapshot with a fresh optimizer
and the learning rate warmed up again over `--warmup` steps (the weights, step, data order and learning curve carry
on; Adam's moments restart). `--export FOLDER` writes the best checkpoint
(by the worse of the two dev accuracies) as a `FastDLLMV2Model` folder (the AR model's dimensions, `bd_size` =
`--block-size`, the tokenizer's mask id) with the tokenizer.

    python examples/train_block_diffusion.py --out runs/fdv2 --minutes 60 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dlm_generation.tasks.chain_arith import accuracy, dev_split, train_problems
from dlm_generation.training import block_diffusion_loss, warmup_cosine_lr

ROOT = Path(__file__).resolve().parents[1]
AR_MODEL = ROOT / "model_cards" / "tiny-ar-chain-arith"
RUN_DEFINING = ("init_from", "block_size", "batch_size", "seed")


def training_batch(step: int, batch_size: int, tokenizer, block_size: int, mask_id: int):
    """Input ids and labels of training step `step`: prompt + completion + EOS, mask-padded to whole blocks."""
    problems = train_problems(step * batch_size, (step + 1) * batch_size)
    prompts = tokenizer([p.prompt for p in problems]).input_ids
    completions = tokenizer([p.completion for p in problems], add_special_tokens=False).input_ids
    lengths = [len(p) + len(c) + 1 for p, c in zip(prompts, completions)]
    length = block_size * math.ceil(max(lengths) / block_size)
    ids = torch.full((len(problems), length), mask_id)
    labels = torch.full((len(problems), length), -100)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        sample = prompt + completion + [tokenizer.eos_token_id]
        ids[row, : len(sample)] = torch.tensor(sample)
        labels[row, len(prompt) : len(sample)] = torch.tensor(completion + [tokenizer.eos_token_id])
    return ids, labels


@torch.no_grad()
def block_decode(model, prompt: list[int], mask_id: int, eos_id: int, gen_length: int, block_size: int,
                 sub_block: int, threshold: float) -> tuple[list[int], int]:
    """Fast-dLLM v2's decoding order without a KV cache (batch 1); returns the completion ids and the forwards."""
    x = torch.tensor([prompt])
    limit = len(prompt) + gen_length
    forwards = 0
    while x.shape[1] < limit:
        block_start = block_size * (x.shape[1] // block_size)
        fill = min(block_start + block_size, limit) - x.shape[1]
        x = torch.cat([x, torch.full((1, fill), mask_id)], dim=1)
        blocks = torch.arange(x.shape[1]) // block_size
        attention = (blocks[:, None] >= blocks[None, :])[None, None]
        for start in range(block_start, x.shape[1], sub_block):
            end = min(start + sub_block, x.shape[1])
            while bool((x[0, start:end] == mask_id).any()):
                logits = model(input_ids=x, attention_mask=attention).logits[0]
                forwards += 1
                shifted = torch.cat([logits[:1], logits[:-1]])[start:end]  # position j reads the logits of j - 1
                probs = shifted.softmax(-1)
                confidence, tokens = probs.max(-1)
                masked = x[0, start:end] == mask_id
                confidence = torch.where(masked, confidence, torch.tensor(-1.0))
                commit = (confidence > threshold) & masked
                commit[confidence.argmax()] = True
                x[0, start:end] = torch.where(commit, tokens, x[0, start:end])
                generated = x[0, len(prompt):]
                stops = (generated == eos_id).nonzero()
                if len(stops) and not bool((generated[: int(stops[0])] == mask_id).any()):
                    return generated[: int(stops[0]) + 1].tolist(), forwards
    return x[0, len(prompt):].tolist(), forwards


def evaluate(model, tokenizer, problems, args) -> dict:
    model.eval()
    results = {}
    for name, threshold in (("one token per step", 1.0), ("threshold 0.9", 0.9)):
        completions, forwards = [], 0
        for problem in problems:
            ids, n = block_decode(model, tokenizer(problem.prompt).input_ids, args.mask_id, tokenizer.eos_token_id,
                                  args.eval_gen_length, args.block_size, args.sub_block, threshold)
            completions.append(tokenizer.decode(ids, skip_special_tokens=True))
            forwards += n
        results[name] = {"accuracy": accuracy(completions, problems), "forwards": forwards / len(problems)}
    model.train()
    return results


def learning_rate(step: int, args, rewarm_from: int | None = None) -> float:
    """Linear warm-up, then cosine decay to --min-lr at --steps; warmed up again from `rewarm_from` (a resume with
    a fresh optimizer)."""
    rate = warmup_cosine_lr(step, args.lr, args.min_lr, args.warmup, args.steps)
    if rewarm_from is not None and step - rewarm_from < args.warmup:
        rate *= (step - rewarm_from + 1) / args.warmup
    return rate


def export(ar_model, tokenizer, weights: dict, args) -> None:
    """The best checkpoint as a Fast-dLLM v2 model folder: the AR model's dimensions in a `FastDLLMV2Config`
    (`bd_size` = the trained block size, the tokenizer's mask id), its weights (Qwen2's parameter names, unchanged),
    and the tokenizer."""
    from dlm_generation import FastDLLMV2Config, FastDLLMV2Model
    from dlm_generation.hub import save_without_code

    ar = ar_model.config
    config = FastDLLMV2Config(
        bd_size=args.block_size, mask_token_id=args.mask_id, vocab_size=ar.vocab_size, hidden_size=ar.hidden_size,
        intermediate_size=ar.intermediate_size, num_hidden_layers=ar.num_hidden_layers,
        num_attention_heads=ar.num_attention_heads, num_key_value_heads=ar.num_key_value_heads,
        max_position_embeddings=ar.max_position_embeddings, rms_norm_eps=ar.rms_norm_eps,
        rope_theta=ar.rope_parameters["rope_theta"], tie_word_embeddings=ar.tie_word_embeddings,
        bos_token_id=ar.bos_token_id, eos_token_id=ar.eos_token_id, pad_token_id=ar.pad_token_id,
    )
    model = FastDLLMV2Model(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [name for name in missing if name != "lm_head.weight" or not ar.tie_word_embeddings]:
        raise SystemExit(f"the checkpoint does not fit FastDLLMV2Model: missing {missing}, unexpected {unexpected}")
    save_without_code(model, args.export)  # a folder of this repository: loaded with the installed package
    tokenizer.save_pretrained(args.export)
    print(f"wrote {args.export}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, log); resumes from it")
    parser.add_argument("--init-from", default=str(AR_MODEL.relative_to(ROOT)), help="the Qwen2 AR model folder")
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this invocation")
    parser.add_argument("--steps", type=int, default=2400, help="schedule length (cosine decay ends here)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step (each gives two rows)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--sub-block", type=int, default=8, help="evaluation: sub-block length")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--min-lr", type=float, default=3e-5)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--eval-problems", type=int, default=100)
    parser.add_argument("--eval-gen-length", type=int, default=256)
    parser.add_argument("--save-minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snapshot", type=Path, help="also keep the weights and run state here (resume source)")
    parser.add_argument("--export", type=Path, help="write the best checkpoint as a model folder and exit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    source = Path(args.init_from) if Path(args.init_from).is_absolute() else ROOT / args.init_from
    tokenizer = AutoTokenizer.from_pretrained(source)
    args.mask_id = tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint_path, best_path, log_path = args.out / "checkpoint.pt", args.out / "best.pt", args.out / "log.json"

    if args.export:
        export(model, tokenizer, torch.load(best_path, weights_only=True), args)
        return

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    defining = {name: getattr(args, name) for name in RUN_DEFINING}
    state = {"step": 0, "train_seconds": 0.0, "curve": [], "best_metric": None, "args": defining, "invocations": []}
    if checkpoint_path.exists():
        saved = torch.load(checkpoint_path, weights_only=False)
        if saved["state"]["args"] != defining:
            raise SystemExit(f"{args.out} was started with {saved['state']['args']}, not {defining}")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
    elif args.snapshot and (args.snapshot / "state.json").exists():
        state = json.loads((args.snapshot / "state.json").read_text())
        if state["args"] != defining:
            raise SystemExit(f"{args.snapshot} was started with {state['args']}, not {defining}")
        model.load_state_dict(load_file(args.snapshot / "model.safetensors"))
        state["rewarm_from"] = state["step"]
        print(f"resumed from {args.snapshot} at step {state['step']} with a fresh optimizer")
    state["invocations"].append({"from_step": state["step"], "lr": args.lr, "min_lr": args.min_lr,
                                 "warmup": args.warmup, "steps": args.steps, "threads": args.threads})
    problems = dev_split(args.eval_problems)
    generator = torch.Generator().manual_seed(args.seed)

    def save() -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state},
                   checkpoint_path.with_suffix(".tmp"))
        checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)
        log_path.write_text(json.dumps(state, indent=1) + "\n")

    def evaluate_and_keep_best(loss: float | None) -> None:
        results = evaluate(model, tokenizer, problems, args)
        metric = min(r["accuracy"] for r in results.values())
        state["curve"].append({"step": state["step"], "train_minutes": state["train_seconds"] / 60, "loss": loss,
                               "dev": results})
        print(f"step {state['step']}: loss {loss}, " + ", ".join(
            f"{name} {100 * r['accuracy']:.1f}% ({r['forwards']:.1f} forwards)" for name, r in results.items()),
            flush=True)
        if state["best_metric"] is None or metric > state["best_metric"]:
            state["best_metric"], state["best_step"] = metric, state["step"]
            torch.save(model.state_dict(), best_path)

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    model.train()
    if state["step"] == 0 and not state["curve"]:
        evaluate_and_keep_best(None)
    started = last_save = time.time()
    losses = []
    while state["step"] < args.steps and not stop["now"] and time.time() - started < args.minutes * 60:
        began = time.time()
        # The masks of step s depend only on s, so a resumed run draws what an uninterrupted one would.
        generator.manual_seed(args.seed * 10**7 + state["step"])
        ids, labels = training_batch(state["step"], args.batch_size, tokenizer, args.block_size, args.mask_id)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(state["step"], args, state.get("rewarm_from"))
        loss = block_diffusion_loss(model, ids, labels, args.mask_id, args.block_size, generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        state["step"] += 1
        state["train_seconds"] += time.time() - began
        if state["step"] % args.eval_every == 0:
            evaluate_and_keep_best(sum(losses) / len(losses))
            losses = []
            save()
            last_save = time.time()
        elif time.time() - last_save > args.save_minutes * 60:
            save()
            last_save = time.time()
    save()
    if args.snapshot:
        args.snapshot.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.snapshot / "model.safetensors")
        (args.snapshot / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    print(f"stopped at step {state['step']} ({state['train_seconds'] / 60:.0f} training minutes)")


if __name__ == "__main__":
    main()
