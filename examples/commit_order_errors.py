"""Where a chain-arith diffusion model's wrong tokens come from: the order in which decoding committed them.

Decodes dev problems with a configuration (default: Fast-dLLM threshold 0.9, block 32, gen 256, early stop) and
sorts every committed token up to the row's first EOS by what it could see of the completion to its left when it
was committed (from `output_commit_steps`):

    frontier  every position to its left was already committed (left-to-right order)
    parallel  some position to its left was committed in the same forward, none later
    ahead     some position to its left was still masked and was committed later

and prints, per class, how many tokens, the share that differ from the reference (the tokenized completion, then
EOS), and their mean confidence; then, for every wrong answer, the class of its first wrong token.

    python examples/commit_order_errors.py model_cards/tiny-llada-chain-arith --problems 200
    python examples/commit_order_errors.py model_cards/tiny-llada-chain-arith --block-length 8 --no-threshold
    python examples/commit_order_errors.py model_cards/tiny-llada-chain-arith --settings '{"position_decay": 0.03}'
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401  (registers the model types)
from dlm_generation import generated_lengths
from dlm_generation.benchmark import BASE_CONFIG, prompt_batches, reference_tokens
from dlm_generation.tasks import dev_split, is_correct

CLASSES = ("frontier", "parallel", "ahead")


def commit_classes(commit_steps: torch.Tensor) -> torch.Tensor:
    """Per position, 0 (frontier), 1 (parallel) or 2 (ahead) from a (batch, length) tensor of commit steps."""
    latest_left = torch.cummax(commit_steps, dim=1).values  # latest commit at or before each position
    latest_left = torch.cat([torch.full_like(latest_left[:, :1], -1), latest_left[:, :-1]], dim=1)
    return (latest_left == commit_steps).long() + 2 * (latest_left > commit_steps).long()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--no-threshold", action="store_true", help="one token per step instead of threshold 0.9")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", type=json.loads, default={},
                        help='more generation fields as JSON, e.g. \'{"position_decay": 0.03}\'')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    settings = {**BASE_CONFIG, "alg": "low_confidence", "steps": args.gen_length, "block_length": args.block_length,
                "eos_early_stop": True, "threshold": None if args.no_threshold else 0.9, **args.settings}
    problems = list(dev_split(args.problems))
    tokens, wrong, confidence = Counter(), Counter(), Counter()
    first_wrong, solved = Counter(), 0
    for chunk, inputs in prompt_batches(tokenizer, problems, args.batch_size, model.device):
        with torch.inference_mode():
            out = model.diffusion_generate(inputs.input_ids, attention_mask=inputs.attention_mask,
                                           max_new_tokens=args.gen_length, return_dict_in_generate=True,
                                           output_confidences=True, output_commit_steps=True, **settings)
        generated = out.sequences[:, inputs.input_ids.shape[1]:]
        reference = reference_tokens(tokenizer, chunk, generated)
        classes = commit_classes(out.commit_steps)
        lengths = generated_lengths(generated, tokenizer.eos_token_id)
        for row, problem in enumerate(chunk):
            n = int(lengths[row])
            errors = generated[row, :n] != reference[row, :n]
            for c in range(3):
                members = classes[row, :n] == c
                tokens[c] += int(members.sum())
                wrong[c] += int((errors & members).sum())
                confidence[c] += float(out.confidences[row, :n][members].nan_to_num(1.0).sum())
            text = tokenizer.decode(generated[row, :n], skip_special_tokens=True)
            if is_correct(text, problem):
                solved += 1
            elif errors.any():
                first_wrong[int(classes[row, int(errors.nonzero()[0])])] += 1
    decoding = "one token per step" if settings["threshold"] is None else f"threshold {settings['threshold']}"
    decoding += "".join(f", {key}={value}" for key, value in args.settings.items() if key != "threshold")
    print(f"{args.model}: {decoding}, block {args.block_length}, gen {args.gen_length}: "
          f"{solved}/{len(problems)} solved")
    print("| commit order | tokens | share wrong | mean confidence | wrong answers whose first wrong token is here |")
    print("|---|---|---|---|---|")
    for c, name in enumerate(CLASSES):
        share = wrong[c] / tokens[c] if tokens[c] else float("nan")
        mean = confidence[c] / tokens[c] if tokens[c] else float("nan")
        print(f"| {name} | {tokens[c]} | {100 * share:.2f}% | {mean:.3f} | {first_wrong[c]} |")


if __name__ == "__main__":
    main()
