"""Fast-dLLM v2's block-diffusion training objective (`dlm_generation.training.block_diffusion_loss`)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dlm_generation.training import block_diffusion_attention_mask, block_diffusion_loss

MASK = 3


def test_the_attention_mask_is_fast_dllm_v2s_three_part_mask():
    length, block = 6, 2
    mask = block_diffusion_attention_mask(length, block)[0, 0]
    for q in range(2 * length):
        for k in range(2 * length):
            q_clean, k_clean = q >= length, k >= length
            q_block, k_block = (q - length * q_clean) // block, (k - length * k_clean) // block
            if not q_clean and not k_clean:
                expected = q_block == k_block  # noisy: its own noisy block only
            elif not q_clean and k_clean:
                expected = k_block < q_block  # noisy: the clean blocks before it
            elif q_clean and not k_clean:
                expected = False  # clean never sees noisy
            else:
                expected = k_block <= q_block  # clean: block-causal over clean
            assert bool(mask[q, k]) == expected, (q, k)


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(config).eval()


@torch.no_grad()
def test_the_loss_learns_each_label_once_through_the_two_views():
    """With the same seed, the loss equals the mean cross-entropy of a hand-built pair of rows: the masked view and
    its complement, each read as [x_t ; x_0] under the mask, positions shared, logits shifted by one."""
    model = tiny_qwen2()
    ids = torch.randint(4, 32, (2, 8))
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt
    loss = block_diffusion_loss(model, ids, labels, MASK, 4, torch.Generator().manual_seed(1))

    generator = torch.Generator().manual_seed(1)
    rate = torch.rand(2, 2, generator=generator)
    rate = ((1 - 1e-3) * rate + 1e-3).repeat_interleave(4, dim=1)
    masked = (torch.rand(2, 8, generator=generator) < rate) & (labels != -100)
    total, count = 0.0, 0
    attention = block_diffusion_attention_mask(8, 4)
    for view in (masked, ~masked & (labels != -100)):
        assert not bool((view & (labels == -100)).any())  # the prompt is never masked
        noisy = torch.where(view, MASK, ids)
        logits = model(input_ids=torch.cat([noisy, ids], 1), attention_mask=attention.expand(2, -1, -1, -1),
                       position_ids=torch.arange(8).repeat(2)[None].expand(2, -1)).logits[:, :8]
        for row in range(2):
            for i in view[row].nonzero().flatten().tolist():
                total += float(torch.nn.functional.cross_entropy(logits[row, i - 1], ids[row, i]))
                count += 1
    assert count == int((labels != -100).sum())  # every label position exactly once
    torch.testing.assert_close(float(loss), total / count, rtol=1e-5, atol=1e-5)


def test_a_later_block_does_not_change_an_earlier_blocks_noisy_logits():
    model = tiny_qwen2()
    ids = torch.randint(4, 32, (1, 8))
    attention = block_diffusion_attention_mask(8, 4).expand(1, -1, -1, -1)
    positions = torch.arange(8).repeat(2)[None]
    noisy = ids.clone()
    noisy[0, 2] = MASK
    first = model(input_ids=torch.cat([noisy, ids], 1), attention_mask=attention, position_ids=positions).logits
    changed_ids, changed_noisy = ids.clone(), noisy.clone()
    changed_ids[0, 6], changed_noisy[0, 5] = (ids[0, 6] + 1) % 32, MASK  # block 1, clean and noisy
    second = model(input_ids=torch.cat([changed_noisy, changed_ids], 1), attention_mask=attention,
                   position_ids=positions).logits
    torch.testing.assert_close(first[:, :4], second[:, :4])


def test_a_length_that_is_not_whole_blocks_is_refused():
    with pytest.raises(ValueError, match="multiple of block_size"):
        block_diffusion_loss(tiny_qwen2(), torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long),
                             MASK, 4)
