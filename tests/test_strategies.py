"""Unit tests of the three axes of a denoising step (`diffusion_strategies`) on hand-made tensors, no model.

Schedules (`count`), proposals (`propose_tokens`: the token and its confidence per scorer) and commit policies
(`select`) are checked on logits / confidences small enough that the right answer is computed by hand in the
comments: the positions chosen, the tokens, the confidence values, tie-breaking, the "at least one" rules, and that
ineligible positions are never chosen. The sampled parts (Gumbel-max tokens, `alg_temp`, `origin`) are checked
against their distributions on many rows at once, with a fixed seed.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dlm_generation.diffusion_strategies import (
    BudgetedThresholdPolicy,
    EpsSchedule,
    FactorPolicy,
    LinearSchedule,
    OriginPolicy,
    SampledTopKPolicy,
    StepContext,
    ThresholdPolicy,
    TopKPolicy,
    build_strategies,
    descending_ranks,
    filter_top_k_top_p,
    propose_tokens,
)

NEG = float("-inf")
# One row, four positions, vocabulary of five; the logits are log-probabilities, so softmax gives these back.
PROBS = torch.tensor([[
    [0.50, 0.20, 0.10, 0.10, 0.10],  # argmax 0; margin 0.30
    [0.05, 0.05, 0.80, 0.05, 0.05],  # argmax 2; margin 0.75
    [0.10, 0.10, 0.10, 0.30, 0.40],  # argmax 4; margin 0.10
    [0.20, 0.20, 0.20, 0.20, 0.20],  # uniform: argmax 0 (first of the ties); margin 0
]])
LOGITS = PROBS.log()


def ctx(step, count, remaining, schedule=None):
    return StepContext(step=step, count=torch.tensor(count), remaining=torch.tensor(remaining), schedule=schedule)


def neg_entropy(p: torch.Tensor) -> torch.Tensor:
    return (p * p.log()).sum(-1)


# ---------------------------------------------------------------------------------------------------- schedules
def test_linear_schedule_spreads_the_masks_evenly_with_the_remainder_first():
    """LLaDA's get_num_transfer_tokens: 10 masks over 4 steps -> 3, 3, 2, 2; 3 masks -> 1, 1, 1, 0."""
    schedule = LinearSchedule()
    schedule.begin_block(torch.tensor([10, 3]), 4)
    remaining = torch.tensor([10, 3])
    counts = []
    for step in range(4):
        count = schedule.count(step, remaining)
        counts.append(count.tolist())
        remaining = remaining - count
    assert counts == [[3, 1], [3, 1], [2, 1], [2, 0]]
    assert remaining.tolist() == [0, 0]  # the counts of each row sum to its masks


def test_linear_schedule_never_exceeds_the_remaining_masks_and_finishes_at_the_last_step():
    schedule = LinearSchedule()
    schedule.begin_block(torch.tensor([8]), 4)  # 2 per step
    assert schedule.count(0, torch.tensor([8])).tolist() == [2]
    assert schedule.count(1, torch.tensor([1])).tolist() == [1]  # a threshold step already took more
    assert schedule.count(3, torch.tensor([5])).tolist() == [5]  # the last step commits whatever is left
    assert schedule.count(6, torch.tensor([2])).tolist() == [2]  # and so does any step after it
    assert schedule.reveal_fraction(0, torch.tensor([8])).tolist() == [0.25]
    assert schedule.reveal_fraction(1, torch.tensor([0])).tolist() == [0.0]  # nothing left: no division by zero


def test_eps_schedule_commits_the_floor_of_masks_times_one_minus_s_over_t():
    """Dream: t = linspace(1, 1e-3, 5) = [1, .75025, .5005, .25075, .001]; k = int(masks * (1 - s/t))."""
    schedule = EpsSchedule(1e-3)
    schedule.begin_block(torch.tensor([32]), 4)
    remaining, counts = torch.tensor([32]), []
    for step in range(4):
        count = schedule.count(step, remaining)
        counts.append(int(count))
        remaining = remaining - count
    # 32 * .24975 = 7.99 -> 7; 25 * .33289 = 8.32 -> 8; 17 * .49900 = 8.48 -> 8; the last step takes the other 9
    assert counts == [7, 8, 8, 9]
    timesteps = torch.linspace(1, 1e-3, 5)
    assert torch.allclose(schedule.fraction(1), 1 - timesteps[2] / timesteps[1])
    assert schedule.reveal_fraction(3, torch.tensor([9, 4])).tolist() == [1.0, 1.0]


def test_eps_schedule_may_commit_nothing_before_the_last_step():
    """Few masks: int(3 * 0.24975) = 0 -- Dream commits no token at that step (its NFE still counts)."""
    schedule = EpsSchedule(1e-3)
    schedule.begin_block(torch.tensor([3, 40]), 4)
    assert schedule.count(0, torch.tensor([3, 40])).tolist() == [0, 9]  # per row: 40 * .24975 = 9.99 -> 9


# ---------------------------------------------------------------------------------------------------- proposals
@pytest.mark.parametrize("alg", ["low_confidence", "maskgit_plus", "confidence_threshold"])
def test_probability_scorers_give_the_greedy_tokens_probability(alg):
    proposal = propose_tokens(LOGITS, alg, 0.0, None, None)
    assert proposal.tokens.tolist() == [[0, 2, 4, 0]]
    assert torch.allclose(proposal.confidence, torch.tensor([[0.5, 0.8, 0.4, 0.2]]))
    assert torch.equal(proposal.probability, proposal.confidence)


def test_topk_margin_is_the_top_two_probabilities_difference():
    proposal = propose_tokens(LOGITS, "topk_margin", 0.0, None, None)
    assert proposal.tokens.tolist() == [[0, 2, 4, 0]]
    assert torch.allclose(proposal.confidence, torch.tensor([[0.3, 0.75, 0.1, 0.0]]), atol=1e-6)
    assert torch.allclose(proposal.probability, torch.tensor([[0.5, 0.8, 0.4, 0.2]]))


def test_entropy_is_the_negative_entropy_of_the_distribution():
    proposal = propose_tokens(LOGITS, "entropy", 0.0, None, None)
    assert torch.allclose(proposal.confidence, neg_entropy(PROBS), atol=1e-5)
    assert proposal.confidence[0, 1] > proposal.confidence[0, 0] > proposal.confidence[0, 3]  # peaked first
    assert math.isclose(float(proposal.confidence[0, 3]), -math.log(5), rel_tol=1e-5)  # uniform: -log V


def test_random_and_origin_scores_do_not_look_at_the_logits():
    torch.manual_seed(0)
    random = propose_tokens(LOGITS, "random", 0.0, None, None)
    torch.manual_seed(0)
    flipped = propose_tokens(-LOGITS, "random", 0.0, None, None)
    assert random.tokens.tolist() == [[0, 2, 4, 0]]
    assert torch.equal(random.confidence, flipped.confidence)  # the same draw whatever the logits
    assert ((random.confidence >= 0) & (random.confidence < 1)).all() and random.probability is None
    origin = propose_tokens(LOGITS, "origin", 0.0, None, None)
    assert origin.tokens.tolist() == [[0, 2, 4, 0]] and not origin.confidence.any() and origin.probability is None
    # caches that read p(token) get it for these scorers too
    needed = propose_tokens(LOGITS, "origin", 0.0, None, None, need_probability=True)
    assert torch.allclose(needed.probability, torch.tensor([[0.5, 0.8, 0.4, 0.2]]))


def test_excluded_ids_get_confidence_zero_and_renormalise_the_rest():
    """LLaDA's confidence_eos_eot_inf: id 4 (EOS) is still proposed at position 2 but scores 0, and the other
    positions' p is renormalised without it (position 0: 0.5 / 0.9)."""
    proposal = propose_tokens(LOGITS, "low_confidence", 0.0, None, None, confidence_excluded_ids=torch.tensor([4]))
    assert proposal.tokens.tolist() == [[0, 2, 4, 0]]
    assert torch.allclose(proposal.confidence, torch.tensor([[0.5 / 0.9, 0.8 / 0.95, 0.0, 0.25]]))
    margin = propose_tokens(LOGITS, "topk_margin", 0.0, None, None, confidence_excluded_ids=torch.tensor([4]))
    assert torch.allclose(margin.confidence[0, 2], torch.tensor(0.2 / 0.6))  # (0.3 - 0.1) / 0.6, id 4 removed


def test_never_drawn_ids_are_skipped_but_keep_their_share_of_the_probability():
    """The mask id (2 here) is never proposed: position 1 proposes its runner-up (id 0, the first of four ties at
    0.05) with p = 0.05 under the full distribution."""
    proposal = propose_tokens(LOGITS, "low_confidence", 0.0, None, None, never_drawn_ids=torch.tensor([2]))
    assert proposal.tokens.tolist() == [[0, 0, 4, 0]]
    assert torch.allclose(proposal.confidence, torch.tensor([[0.5, 0.05, 0.4, 0.2]]))
    torch.manual_seed(1)
    sampled = propose_tokens(LOGITS.expand(1000, 4, 5), "low_confidence", 1.0, None, None,
                             never_drawn_ids=torch.tensor([2]))
    assert not (sampled.tokens == 2).any()


def test_top_k_and_top_p_filter_before_scoring():
    """top_p=0.6 keeps the smallest prefix whose mass reaches 0.6: position 0 keeps {0: .5, 1: .2} -> p = .5/.7."""
    proposal = propose_tokens(LOGITS, "low_confidence", 0.0, None, 0.6)
    assert proposal.tokens[:, :3].tolist() == [[0, 2, 4]]  # (position 3 is a five-way tie: not compared)
    assert torch.allclose(proposal.confidence[0, :3], torch.tensor([0.5 / 0.7, 1.0, 0.4 / 0.7]))
    top1 = propose_tokens(LOGITS, "low_confidence", 0.0, 1, None)
    assert top1.tokens.tolist() == [[0, 2, 4, 0]]
    # top_k=1 leaves one candidate, p = 1; the uniform position keeps all five ties at the k-th value, p = 0.2
    assert torch.allclose(top1.confidence, torch.tensor([[1.0, 1.0, 1.0, 0.2]]))


def test_top_p_is_decided_on_the_tempered_distribution_and_confidence_on_the_untempered_one():
    """Row [.5, .2, .1, .1, .1] at temperature 0.5 is p^2 renormalised = [.781, .125, .031, .031, .031]: top_p 0.65
    keeps token 0 alone, so every draw is token 0, with confidence 1 under the filtered (untempered) p."""
    torch.manual_seed(0)
    proposal = propose_tokens(LOGITS[:, :1].expand(64, 1, 5), "low_confidence", 0.5, None, 0.65)
    assert (proposal.tokens == 0).all() and torch.allclose(proposal.confidence, torch.ones(64, 1))
    greedy = propose_tokens(LOGITS[:, :1], "low_confidence", 0.0, None, 0.65)  # untempered: {0, 1} kept
    assert torch.allclose(greedy.confidence, torch.tensor([[0.5 / 0.7]]))


def test_filter_top_k_top_p_keeps_the_nucleus_then_the_top_k():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = lambda k, p: (filter_top_k_top_p(logits, k, p) > torch.finfo(logits.dtype).min).tolist()  # noqa: E731
    assert kept(None, 0.7) == [True, True, False, False]  # cumulative .5, .8: the token that crosses 0.7 stays
    assert kept(None, 0.45) == [True, False, False, False]  # the first token always stays
    assert kept(None, 1.0) == [True] * 4
    assert kept(3, None) == [True, True, True, False]
    assert kept(1, 0.9) == [True, False, False, False]
    ties = torch.tensor([2.0, 1.0, 1.0, 0.0])
    assert (filter_top_k_top_p(ties, 2, None) > -1e30).tolist() == [True, True, True, False]  # ties at the k-th stay


def test_sampling_draws_tokens_with_the_tempered_softmax_probabilities():
    """Gumbel-max on logits / T: 20,000 draws of [.5, .3, .2] at T=1 and at T=0.5 ([.25, .09, .04] / .38)."""
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(1, 20_000, 3)
    for temperature, expected in ((1.0, [0.5, 0.3, 0.2]), (0.5, [0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38])):
        torch.manual_seed(0)
        proposal = propose_tokens(logits, "low_confidence", temperature, None, None)
        frequencies = torch.bincount(proposal.tokens.flatten(), minlength=3) / 20_000
        assert torch.allclose(frequencies, torch.tensor(expected), atol=0.015), (temperature, frequencies)
        # the confidence is p(token) under the untempered distribution
        assert torch.allclose(proposal.confidence, torch.tensor([0.5, 0.3, 0.2])[proposal.tokens])


def test_sampling_is_reproducible_with_a_seed():
    logits = torch.randn(2, 16, 11, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    first = propose_tokens(logits, "low_confidence", 1.0, None, None).tokens
    torch.manual_seed(7)
    assert torch.equal(first, propose_tokens(logits, "low_confidence", 1.0, None, None).tokens)


def test_half_precision_logits_are_scored_in_float32():
    proposal = propose_tokens(LOGITS.to(torch.bfloat16), "low_confidence", 0.0, None, None)
    assert proposal.confidence.dtype == torch.float32 and proposal.tokens.tolist() == [[0, 2, 4, 0]]


# ---------------------------------------------------------------------------------------------------- ranks
def test_descending_ranks_break_ties_toward_the_lower_index():
    confidence = torch.tensor([[0.2, 0.7, NEG, 0.7, 0.9], [0.0, 0.0, 0.0, NEG, 0.0]])
    sorted_conf, ranks = descending_ranks(confidence)
    assert ranks.tolist() == [[3, 1, 4, 2, 0], [0, 1, 2, 4, 3]]
    assert torch.equal(sorted_conf[0], torch.tensor([0.9, 0.7, 0.7, 0.2, NEG]))


# ---------------------------------------------------------------------------------------------------- policies
# Confidences hold -inf at ineligible positions (the loop writes them so); position 1 below is ineligible.
CONF = torch.tensor([[0.9, NEG, 0.3, 0.7, 0.7]])
ELIGIBLE = torch.tensor([[True, False, True, True, True]])


@pytest.mark.parametrize("count, chosen", [(0, []), (1, [0]), (2, [0, 3]), (3, [0, 3, 4]), (4, [0, 2, 3, 4]),
                                           (5, [0, 2, 3, 4])])
def test_top_k_commits_the_counts_most_confident_eligible_positions(count, chosen):
    commit = TopKPolicy().select(CONF, ELIGIBLE, ctx(0, [count], [4]))
    assert commit[0].nonzero().flatten().tolist() == chosen  # the 0.7 tie goes to position 3 first


def test_top_k_uses_each_rows_own_count():
    confidence = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, NEG, NEG], [NEG, NEG, NEG, NEG]])
    eligible = confidence > NEG
    commit = TopKPolicy().select(confidence, eligible, ctx(0, [3, 1, 0], [4, 2, 0]))
    assert commit.tolist() == [[False, True, True, True], [True, False, False, False], [False] * 4]


def test_threshold_commits_every_confident_position_inclusive():
    commit = ThresholdPolicy(0.7).select(CONF, ELIGIBLE, ctx(0, [1], [4]))
    assert commit[0].nonzero().flatten().tolist() == [0, 3, 4]  # 0.7 >= 0.7 passes; the count (1) is not used


def test_threshold_always_commits_the_most_confident_position():
    confidence = torch.tensor([[0.1, 0.3, 0.3, NEG], [NEG, NEG, NEG, NEG]])
    commit = ThresholdPolicy(0.9).select(confidence, confidence > NEG, ctx(0, [1, 0], [3, 0]))
    assert commit.tolist() == [[False, True, False, False], [False] * 4]  # leftmost of the tie; a done row: none


def test_budgeted_threshold_caps_the_threshold_rule_at_the_steps_budget():
    """10 masks over 4 steps: cumulative budgets 3, 6, 8, 10 (remainder first). Unspent budget carries over."""
    policy = BudgetedThresholdPolicy(0.5)
    policy.begin_block(torch.tensor([10]), 4)
    confident = torch.linspace(0.99, 0.9, 10)[None]  # all pass, descending
    eligible = torch.ones(1, 10, dtype=torch.bool)
    first = policy.select(confident, eligible, ctx(0, [3], [10]))
    assert first[0].nonzero().flatten().tolist() == [0, 1, 2]  # budget 3
    unsure = torch.tensor([[NEG, NEG, NEG, 0.6, 0.1, 0.2, 0.55, 0.3, 0.2, 0.1]])
    second = policy.select(unsure, unsure > NEG, ctx(1, [3], [7]))
    assert second[0].nonzero().flatten().tolist() == [3, 6]  # budget 6 - 3 = 3, but only two pass 0.5
    low = torch.tensor([[NEG, NEG, NEG, NEG, 0.1, 0.2, NEG, 0.3, 0.2, 0.1]])
    third = policy.select(low, low > NEG, ctx(2, [2], [5]))
    assert third[0].nonzero().flatten().tolist() == [7]  # none passes: the most confident one anyway
    left = torch.tensor([[False, False, False, False, True, True, False, False, True, True]])
    last = policy.select(torch.where(left, confident, NEG), left, ctx(3, [4], [4]))
    assert last[0].nonzero().flatten().tolist() == [4, 5, 8, 9]  # the last step's budget: every remaining mask
    left[0, 4] = False
    unsure_last = torch.where(left, torch.tensor([[0.0] * 5 + [0.2, 0.0, 0.0, 0.9, 0.4]]), NEG)
    assert policy.select(unsure_last, left, ctx(3, [3], [3]))[0].nonzero().flatten().tolist() == [8]  # threshold


def test_budgeted_threshold_carries_unspent_budget_over():
    """Step 0 (budget 3) committed only one: step 1 may commit 6 - 1 = 5."""
    policy = BudgetedThresholdPolicy(0.5)
    policy.begin_block(torch.tensor([10]), 4)
    eligible = torch.ones(1, 10, dtype=torch.bool)
    eligible[0, 0] = False
    confident = torch.where(eligible, torch.linspace(0.99, 0.9, 10)[None], NEG)
    commit = policy.select(confident, eligible, ctx(1, [3], [9]))
    assert commit[0].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]


def test_factor_commits_the_leading_run_above_one_minus_factor_over_rank_plus_one():
    """factor 1: rank r passes with c >= 1 - 1/(r+1): r=2 needs .667, r=3 .75, r=4 .8 (rank 1 always passes)."""
    policy = FactorPolicy(1.0)
    confidence = torch.tensor([[0.7, 0.2, 0.9, 0.74, 0.1, NEG]])  # sorted .9 (r1) .74 (r2 pass) .7 (r3 fail)
    commit = policy.select(confidence, confidence > NEG, ctx(0, [1], [5]))
    assert commit[0].nonzero().flatten().tolist() == [2, 3]
    weak = torch.tensor([[0.3, 0.4, 0.2, 0.1]])
    assert policy.select(weak, weak > NEG, ctx(0, [1], [4]))[0].nonzero().flatten().tolist() == [1]  # rank 1 only


def test_factor_commits_everything_when_the_run_reaches_the_second_to_last_mask():
    policy = FactorPolicy(1.0)
    three = torch.tensor([[0.99, NEG, 0.98, 0.05]])  # the run covers 2 of 3: all 3, the 0.05 too
    assert policy.select(three, three > NEG, ctx(0, [1], [3])).tolist() == [[True, False, True, True]]
    two = torch.tensor([[0.1, 0.05]])  # two remaining masks are always committed together
    assert policy.select(two, two > NEG, ctx(0, [1], [2])).tolist() == [[True, True]]
    done = torch.full((1, 3), NEG)
    assert not policy.select(done, done > NEG, ctx(0, [0], [0])).any()  # a finished row commits nothing


def test_sampled_top_k_commits_exactly_the_count_among_eligible_positions():
    torch.manual_seed(0)
    confidence = torch.tensor([[0.9, NEG, 0.3, 0.7, 0.7]]).expand(500, 5)
    commit = SampledTopKPolicy(1.0).select(confidence, ELIGIBLE.expand(500, 5), ctx(0, [2] * 500, [4] * 500))
    assert (commit.sum(-1) == 2).all() and not commit[:, 1].any()
    near_zero = SampledTopKPolicy(1e-6).select(CONF, ELIGIBLE, ctx(0, [2], [4]))  # a cold draw is the top-k
    assert near_zero[0].nonzero().flatten().tolist() in ([0, 3], [0, 4])


def test_sampled_top_k_draws_positions_with_softmax_of_confidence_over_alg_temp():
    """Count 1: position i is drawn with probability softmax(c / alg_temp)_i = [.5, .3, .2] for c = log p."""
    torch.manual_seed(0)
    rows = 20_000
    confidence = torch.tensor([0.5, 0.3, 0.2]).log().expand(rows, 3)
    commit = SampledTopKPolicy(1.0).select(confidence, torch.ones(rows, 3, dtype=torch.bool),
                                           ctx(0, [1] * rows, [3] * rows))
    frequencies = commit.float().mean(0)
    assert torch.allclose(frequencies, torch.tensor([0.5, 0.3, 0.2]), atol=0.015), frequencies


def test_origin_reveals_each_eligible_mask_with_the_schedules_probability():
    """Dream origin: p = 1 - s/t; with eps 0.5 and 2 steps, t = [1, .75, .5]: step 0 reveals a quarter."""
    torch.manual_seed(0)
    schedule = EpsSchedule(0.5)
    rows = 4000
    eligible = torch.tensor([[True, False, True, True, True, True, True, True]]).expand(rows, 8)
    schedule.begin_block(eligible.sum(-1), 2)
    confidence = torch.zeros(rows, 8).masked_fill(~eligible, NEG)
    policy = OriginPolicy()
    commit = policy.select(confidence, eligible, StepContext(0, schedule.count(0, eligible.sum(-1)),
                                                             eligible.sum(-1), schedule))
    assert not commit[:, 1].any()
    assert abs(commit[:, eligible[0]].float().mean().item() - 0.25) < 0.01
    last = policy.select(confidence, eligible, StepContext(1, eligible.sum(-1), eligible.sum(-1), schedule))
    assert torch.equal(last, eligible)  # the last step reveals every remaining mask


# ---------------------------------------------------------------------------------------------------- a block
@pytest.mark.parametrize("policy", [TopKPolicy(), ThresholdPolicy(0.6), BudgetedThresholdPolicy(0.6),
                                    FactorPolicy(1.0)], ids=["topk", "threshold", "budgeted", "factor"])
@pytest.mark.parametrize("schedule", [LinearSchedule(), EpsSchedule(1e-3)], ids=["linear", "eps"])
def test_a_block_commits_each_eligible_position_once_and_nothing_else(policy, schedule):
    """A loop as generation_utils runs it: rows with 10 and 3 masks (and 7 ineligible positions) in one window,
    fixed random confidences; every eligible position is committed exactly once, within a few steps."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 10, generator=generator)
    eligible = torch.ones(2, 10, dtype=torch.bool)
    eligible[1, [0, 2, 3, 5, 6, 8, 9]] = False
    start = eligible.clone()
    schedule.begin_block(eligible.sum(-1), 4)
    policy.begin_block(eligible.sum(-1), 4)
    committed_at = torch.full((2, 10), -1)
    for step in range(10):
        remaining = eligible.sum(-1)
        if not remaining.any():
            break
        commit = policy.select(torch.where(eligible, scores, NEG), eligible,
                               StepContext(step, schedule.count(step, remaining), remaining, schedule))
        assert not (commit & ~eligible).any(), "an ineligible or already committed position was chosen"
        assert (commit.sum(-1) >= (remaining > 0).long()).all() or isinstance(policy, TopKPolicy)
        committed_at[commit] = step
        eligible = eligible & ~commit
    assert not eligible.any() and torch.equal(committed_at >= 0, start)
    if isinstance(policy, TopKPolicy):
        assert int(committed_at.max()) == 3  # the schedule's policy finishes exactly at the block's last step


def test_top_k_with_the_linear_schedule_commits_in_confidence_order():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.8, 0.3, 0.7, 0.2]])
    eligible = torch.ones(1, 7, dtype=torch.bool)
    schedule, policy = LinearSchedule(), TopKPolicy()
    schedule.begin_block(eligible.sum(-1), 3)  # 7 over 3 steps: 3, 2, 2
    order = []
    for step in range(3):
        remaining = eligible.sum(-1)
        commit = policy.select(torch.where(eligible, scores, NEG), eligible,
                               StepContext(step, schedule.count(step, remaining), remaining, schedule))
        order.append(commit[0].nonzero().flatten().tolist())
        eligible &= ~commit
    assert order == [[1, 3, 5], [2, 4], [0, 6]]


# ---------------------------------------------------------------------------------------------------- assembly
def config(**fields):
    base = dict(schedule="linear", eps=1e-3, alg="low_confidence", threshold=None, factor=None, alg_temp=None)
    return SimpleNamespace(**{**base, **fields})


@pytest.mark.parametrize("fields, policy_class", [
    (dict(), TopKPolicy),
    (dict(alg_temp=0.5), SampledTopKPolicy),
    (dict(threshold=0.9), ThresholdPolicy),
    (dict(threshold=0.9, alg_temp=0.5), ThresholdPolicy),  # the threshold decides, alg_temp is not used
    (dict(factor=1.0), FactorPolicy),
    (dict(alg="confidence_threshold", threshold=0.9), BudgetedThresholdPolicy),
    (dict(alg="origin"), OriginPolicy),
])
def test_build_strategies_picks_the_policy(fields, policy_class):
    strategies = build_strategies(config(**fields))
    assert type(strategies.policy) is policy_class and strategies.alg == config(**fields).alg
    if "threshold" in fields:
        assert strategies.policy.threshold == fields["threshold"]


def test_build_strategies_picks_the_schedule():
    assert type(build_strategies(config()).schedule) is LinearSchedule
    eps = build_strategies(config(schedule="eps", eps=0.25)).schedule
    assert type(eps) is EpsSchedule and eps.eps == 0.25


def test_the_policy_commit_rule_writes_the_proposals_and_forced_positions_replace_a_rows_choice():
    from dlm_generation.diffusion_strategies import PolicyCommitRule, TopKPolicy

    rule = PolicyCommitRule(TopKPolicy())
    confidence = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    eligible = torch.ones(2, 3, dtype=torch.bool)
    tokens = torch.tensor([[7, 8, 9], [4, 5, 6]])
    ctx = StepContext(step=0, count=torch.tensor([1, 1]), remaining=torch.tensor([3, 3]), schedule=LinearSchedule())
    commit, written = rule.choose(torch.zeros(2, 3, dtype=torch.long), tokens, confidence, eligible, ctx, 0)
    assert commit.tolist() == [[False, True, False], [True, False, False]] and written is tokens
    forced = torch.tensor([[True, False, False], [False, False, False]])
    merged = rule.merge_forced(commit, forced)
    assert merged.tolist() == [[True, False, False], [True, False, False]]  # row 0: the forced position only
