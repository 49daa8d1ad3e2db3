"""Training objective of the shipped diffusion models: masked-diffusion loss on the states decoding visits.

`masked_diffusion_loss` is what `examples/train_chain_arith.py` trains with and what a LoRA fine-tune can use
(`examples/finetune_lora.py`). Semi-autoregressive decoding sees everything before the current block committed,
the block partly masked and everything after it masked; `decode_state_mask` draws such states (and, for the rest,
LLaDA's uniform masking over the whole canvas).
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

BLOCK_LENGTHS = (8, 16, 32, 64)  # block sizes of the decode-state masks, drawn with BLOCK_WEIGHTS
BLOCK_WEIGHTS = (2, 1, 3, 1)
PAD_WEIGHT = 16.0  # in whole-canvas masks, the EOS padding after the first EOS weighs as much as 16 tokens in all


def warmup_cosine_lr(step: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """The learning rate of step `step`: linear warm-up over `warmup` steps to `lr`, then cosine decay to `min_lr` at
    step `steps` (constant after it)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def result_positions(completion: list[int], tokenizer) -> list[int]:
    """Indices of the completion's computed digits: each result after ` =` and the answer after ` ####`.

    These are the tokens that need the arithmetic (the rest is copied from the prompt or fixed format), so
    decode states with the frontier on them teach what decoding gets wrong.
    """
    pieces = tokenizer.convert_ids_to_tokens(completion)
    text = [tokenizer.convert_tokens_to_string([piece]) for piece in pieces]
    positions, after_sign = [], False
    for index, piece in enumerate(text):
        if piece.strip() in ("=", "####"):
            after_sign = True
        elif piece.strip().isdigit() and after_sign:
            positions.append(index)
        elif piece.strip():
            after_sign = False
    return positions


def decode_state_mask(rng: random.Random, answer: int, canvas: int, block_prob: float,
                      lookahead_weight: float = 1.0, hard: list[int] = (),
                      hard_prob: float = 0.0) -> tuple[list[bool], list[float]]:
    """Which canvas positions are masked, and the loss weight of each, for one training row.

    With probability `block_prob` a *decode state* of semi-autoregressive decoding: a block length and a block are
    drawn (any block up to the one after the block holding the first EOS); everything before the block is clean,
    everything after it masked, and inside it either a clean left part (what left-to-right-ish decoding leaves)
    or a random subset is masked; only the block's masked positions carry loss: its first masked position (the
    decoding frontier, whose prediction is what left-to-right-ish decoding commits) weight 1, the ones after it
    `lookahead_weight`. With probability `hard_prob` a decode state is centred on one of the `hard` positions (the
    computed digits, see `result_positions`) instead: the block is the one holding it, it is masked (the frontier in
    the contiguous case) and carries weight 1. Otherwise LLaDA's uniform masking
    over the whole canvas (ratio t ~ U(0, 1]); the EOS padding after the first EOS (positions >= `answer`)
    then carries PAD_WEIGHT in all, so long canvases do not drown the answer in EOS targets.
    """
    if rng.random() < block_prob:
        block = rng.choices(BLOCK_LENGTHS, BLOCK_WEIGHTS)[0]
        if hard and hard_prob and rng.random() < hard_prob:
            target = rng.choice(hard)
            start = block * (target // block)
            stop = min(canvas, start + block)
            size = stop - start
            if rng.random() < 0.5:
                inside = [i >= target - start for i in range(size)]
            else:
                others = [i for i in range(size) if i != target - start]
                chosen = set(rng.sample(others, rng.randint(0, len(others)))) | {target - start}
                inside = [i in chosen for i in range(size)]
            masked = [False] * start + inside + [True] * (canvas - stop)
            frontier = start + inside.index(True)
            weights = [0.0] * canvas
            weights[frontier + 1 : stop] = [lookahead_weight * m for m in inside[frontier - start + 1:]]
            weights[frontier] = weights[target] = 1.0
            return masked, weights
        last = min((canvas - 1) // block, (answer - 1) // block + 1)
        start = block * rng.randint(0, last)
        stop = min(canvas, start + block)
        size = stop - start
        if rng.random() < 0.5:
            clean = rng.randint(0, size - 1)
            inside = [i >= clean for i in range(size)]
        else:
            chosen = set(rng.sample(range(size), rng.randint(1, size)))
            inside = [i in chosen for i in range(size)]
        masked = [False] * start + inside + [True] * (canvas - stop)
        frontier = start + inside.index(True)
        weights = [0.0] * canvas
        weights[frontier] = 1.0
        weights[frontier + 1 : stop] = [lookahead_weight] * (stop - frontier - 1)
        return masked, weights
    t = rng.uniform(1e-3, 1.0)
    masked = [rng.random() < t for _ in range(canvas)]
    if not any(masked):
        masked[rng.randrange(canvas)] = True
    pad = canvas - answer
    weights = [1.0] * answer + [min(1.0, PAD_WEIGHT / pad) if pad else 0.0] * pad
    return masked, weights


def masked_diffusion_loss(model, prompts: list[list[int]], completions: list[list[int]], tokenizer, canvas: int = 0,
                          seed: int = 0, block_prob: float = 0.0, lookahead_weight: float = 1.0,
                          hard_prob: float = 0.0) -> torch.Tensor:
    """Masked-diffusion loss of a batch, on the states decoding visits (see `decode_state_mask`): the mean over rows
    of each row's weighted mean cross-entropy on its masked completion positions; the prompt is never masked.

    `prompts` are token ids (BOS + prompt), `completions` token ids ending with EOS; every row's canvas is padded
    with EOS to `canvas` positions (at least the longest completion), as LLaDA's SFT pads. `block_prob` is the share
    of rows that get a semi-autoregressive decode state instead of uniform masking, `hard_prob` the share of those
    centred on a computed digit (`result_positions`, chain-arith's format). The draw is seeded by `seed`. A model
    with `diffusion_logits_shift = 1` (Dream; also through a PEFT wrapper) reads position i's prediction at i - 1.
    This is the loss `examples/train_chain_arith.py` trains the shipped models with.
    """
    for name in ("mask_token_id", "eos_token_id"):
        if getattr(tokenizer, name, None) is None:
            raise ValueError(
                f"The tokenizer has no {name.replace('_id', '')}: masked-diffusion training writes the mask token into "
                "the canvas and pads completions with EOS. Add it (tokenizer.add_special_tokens({'mask_token': "
                "'<|mdm_mask|>'}) for a mask) with the id the model's config gives (config.mask_token_id)."
            )
    if not prompts or len(prompts) != len(completions):
        raise ValueError(f"prompts ({len(prompts)}) and completions ({len(completions)}) must be non-empty lists of "
                         "the same length: one completion per prompt.")
    canvas = max(canvas, max(len(c) for c in completions))
    length = max(len(p) for p in prompts) + canvas
    batch = len(prompts)
    clean = torch.full((batch, length), tokenizer.eos_token_id)
    masked = torch.zeros(batch, length, dtype=torch.bool)
    weights = torch.zeros(batch, length)
    rng = random.Random(seed)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        clean[row, : len(p) + len(c)] = torch.tensor(p + c)
        row_canvas = length - len(p)  # shorter prompts get a longer canvas (the batch shares one length)
        hard = result_positions(c, tokenizer) if hard_prob else ()
        row_masked, row_weights = decode_state_mask(rng, len(c), row_canvas, block_prob, lookahead_weight,
                                                    hard, hard_prob)
        masked[row, len(p):] = torch.tensor(row_masked)
        weights[row, len(p):] = torch.tensor(row_weights)
    noisy = torch.where(masked, tokenizer.mask_token_id, clean)
    logits = model(input_ids=noisy).logits
    if getattr(model, "diffusion_logits_shift", 0):  # shifted (Dream): position i-1 predicts token i
        logits, clean, masked, weights = logits[:, :-1], clean[:, 1:], masked[:, 1:], weights[:, 1:]
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), clean.reshape(-1), reduction="none")
    weights = weights * masked
    row_loss = (token_loss.view(batch, -1) * weights).sum(1) / weights.sum(1).clamp_min(1e-6)
    return row_loss[weights.sum(1) > 0].mean()


# ------------------------------------------------------------------------------------------ block diffusion
def block_diffusion_attention_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """Fast-dLLM v2's training mask over `[x_t ; x_0]` (2 * `length` positions), True where a query may attend.

    Inside a block, noisy tokens attend to the noisy block and clean tokens to the clean block (bidirectional);
    noisy tokens of block k also see the clean tokens of blocks < k, and clean tokens of block k the clean tokens of
    blocks <= k. Noisy tokens never see another block's noisy tokens, and clean tokens never see noisy ones.
    Shape (1, 1, 2 * length, 2 * length), for a transformers model's 4-D `attention_mask`.
    """
    index = torch.arange(2 * length, device=device)
    clean = index >= length
    block = (index - length * clean) // block_size
    q_block, kv_block = block[:, None], block[None, :]
    q_clean, kv_clean = clean[:, None], clean[None, :]
    same_stream_block = (q_block == kv_block) & (q_clean == kv_clean)
    noisy_sees_earlier_clean = (q_block > kv_block) & kv_clean & ~q_clean
    clean_sees_clean = (q_block >= kv_block) & kv_clean & q_clean
    return (same_stream_block | noisy_sees_earlier_clean | clean_sees_clean)[None, None]


def block_diffusion_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, mask_token_id: int, block_size: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Fast-dLLM v2's block-diffusion loss for a causal LM (e.g. transformers' `Qwen2ForCausalLM`).

    `input_ids` (batch, length) hold whole samples, `length` a multiple of `block_size` (pad with the mask id);
    `labels` the same tokens with -100 where nothing is learned (prompt, padding). Each block draws a masking rate
    t ~ U(0, 1) and each label position is masked with probability t (the prompt never). The model reads the noisy
    sequence followed by the clean one, `[x_t ; x_0]`, both at positions 0..length-1, under
    `block_diffusion_attention_mask`; the complementary view (the positions the first one left unmasked) is a second
    row, so every label position is learned exactly once per sample. The loss is the token shift of an AR model: the
    logits of the noisy stream at position i - 1 predict the masked token at position i; cross-entropy averaged over
    the masked positions, without 1/t weighting.
    """
    batch, length = input_ids.shape
    if length % block_size:
        raise ValueError(f"input length {length} is not a multiple of block_size {block_size}; pad with the mask id")
    device = input_ids.device
    learned = labels != -100
    rate = torch.rand(batch, length // block_size, generator=generator, device=device)
    rate = ((1 - 1e-3) * rate + 1e-3).repeat_interleave(block_size, dim=1)
    masked = (torch.rand(batch, length, generator=generator, device=device) < rate) & learned
    views, targets = [], []
    for view in (masked, ~masked & learned):
        noisy = torch.where(view, torch.full_like(input_ids, mask_token_id), input_ids)
        views.append(torch.cat([noisy, input_ids], dim=1))
        targets.append(torch.where(view, labels, torch.full_like(labels, -100)))
    ids, targets = torch.cat(views), torch.cat(targets)
    positions = torch.arange(length, device=device).repeat(2)[None].expand(ids.shape[0], -1)
    attention = block_diffusion_attention_mask(length, block_size, device)
    logits = model(input_ids=ids, attention_mask=attention.expand(ids.shape[0], -1, -1, -1),
                   position_ids=positions).logits[:, :length]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets[:, 1:].reshape(-1),
                           ignore_index=-100)
