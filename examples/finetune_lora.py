"""Fine-tune a LoRA adapter on a diffusion model with the project's masked-diffusion loss, then generate with it.

    python examples/finetune_lora.py model_cards/tiny-llada-chain-arith runs/lora --steps 200
    dlm-generate model_cards/tiny-llada-chain-arith --peft runs/lora --prompt "Question: Start with 8. Add 75. What is the result?"

Trains on chain-arith training problems (never the dev split) with `dlm_generation.training.masked_diffusion_loss`
(the loss the shipped models were trained with: semi-autoregressive decode states and uniform masking), saves the
adapter with `save_pretrained` (a few hundred KB), and prints the dev accuracy of the base model and of the adapter.
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401  (registers LLaDA and Dream)
from dlm_generation.tasks.chain_arith import accuracy, dev_split, train_problems
from dlm_generation.training import masked_diffusion_loss

# Attention projections of both families' parameter names (LLaDA: q/k/v_proj, attn_out; Dream: q/k/v/o_proj).
TARGETS = ["q_proj", "k_proj", "v_proj", "attn_out", "o_proj"]


def dev_accuracy(model, tokenizer, problems) -> float:
    inputs = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
    out = model.diffusion_generate(**inputs, max_new_tokens=64, steps=64, block_length=32, eos_early_stop=True,
                                   threshold=None, temperature=0.0)
    completions = tokenizer.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    return accuracy(completions, problems)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a LLaDA or Dream folder (or Hub id)")
    parser.add_argument("out", help="where to save the adapter")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--eval-problems", type=int, default=32, help="dev problems for the before/after accuracy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model)
    dev = list(dev_split(args.eval_problems)) if args.eval_problems else []
    if dev:
        print(f"base model: dev accuracy {dev_accuracy(model.eval(), tokenizer, dev):.3f}")

    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=[t for t in TARGETS if any(
                                                 name.endswith(t) for name, _ in model.named_modules())]))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    bar = tqdm(range(args.steps), desc="lora")
    for step in bar:
        problems = train_problems(step * args.batch_size, (step + 1) * args.batch_size)
        prompts = tokenizer([p.prompt for p in problems]).input_ids
        completions = [c + [tokenizer.eos_token_id] for c in
                       tokenizer([p.completion for p in problems], add_special_tokens=False).input_ids]
        loss = masked_diffusion_loss(model, prompts, completions, tokenizer, canvas=64, seed=args.seed * 10**7 + step,
                                     block_prob=0.75, lookahead_weight=0.2)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    model.save_pretrained(args.out)
    print(f"adapter saved to {args.out}")
    if dev:
        print(f"with the adapter: dev accuracy {dev_accuracy(model, tokenizer, dev):.3f}")


if __name__ == "__main__":
    main()
