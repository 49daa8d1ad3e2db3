"""The three independent axes of a denoising step, each a small class behind one verb.

* Schedules (`count`): how many positions a step should commit, per row.
* Proposals (`propose_tokens`): the token proposed at every position and how confident the model is in it (the
  confidence measure is Dream's `alg`, LLaDA's `remasking`).
* Commit policies (`select`): which eligible positions to commit this step, given confidences and the schedule's
  count (top-k, Fast-dLLM threshold / factor, Dream's origin, ...).

`build_strategies(config)` turns the resolved config's strings into these objects once, before the loop.
Everything works on whole batches with per-row tensors: no Python loop over rows and no host synchronisation.

This file travels with saved models, so it imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------- schedules
class LinearSchedule:
    """LLaDA: the masks eligible at block start, spread evenly over the block's steps (remainder first)."""

    def begin_block(self, eligible: torch.Tensor, steps_in_block: int) -> None:
        self.steps = steps_in_block
        self.base = eligible // steps_in_block
        self.remainder = eligible % steps_in_block

    def count(self, step: int, remaining: torch.Tensor) -> torch.Tensor:
        if step >= self.steps - 1:
            return remaining
        return torch.minimum(self.base + (step < self.remainder).long(), remaining)

    def reveal_fraction(self, step: int, remaining: torch.Tensor) -> torch.Tensor:
        return self.count(step, remaining) / remaining.clamp_min(1)


class EpsSchedule:
    """Dream: timesteps `linspace(1, eps, steps + 1)` (float32); a step commits `int(masks * (1 - s/t))`."""

    def __init__(self, eps: float):
        self.eps = eps

    def begin_block(self, eligible: torch.Tensor, steps_in_block: int) -> None:
        self.steps = steps_in_block
        self.timesteps = torch.linspace(1, self.eps, steps_in_block + 1, device=eligible.device)

    def fraction(self, step: int) -> torch.Tensor:
        return 1 - self.timesteps[step + 1] / self.timesteps[step]

    def count(self, step: int, remaining: torch.Tensor) -> torch.Tensor:
        if step >= self.steps - 1:
            return remaining
        return (remaining.to(torch.float32) * self.fraction(step)).long()

    def reveal_fraction(self, step: int, remaining: torch.Tensor) -> torch.Tensor:
        if step >= self.steps - 1:
            return torch.ones_like(remaining, dtype=torch.float32)
        return self.fraction(step).expand(remaining.shape)


# ---------------------------------------------------------------------------------------------------- proposals
def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the nucleus (top_p, applied first) and outside the top_k to the dtype's minimum.

    Works on (..., vocab). The kept set is renormalised by any later softmax, as in Dream's `sample_tokens`.
    """
    fill = torch.finfo(logits.dtype).min
    if top_p is not None and top_p < 1:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative > top_p
        remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_indices, remove_sorted)
        logits = logits.masked_fill(remove, fill)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, fill)
    return logits


@dataclass
class Proposal:
    tokens: torch.LongTensor  # (batch, window)
    confidence: torch.Tensor  # (batch, window), higher = commit earlier
    probability: torch.Tensor | None = None  # (batch, window) p(token), when computed (see propose_tokens)


def propose_tokens(
    logits: torch.Tensor,
    alg: str,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    confidence_excluded_ids: torch.Tensor | None = None,
    never_drawn_ids: torch.Tensor | None = None,
    need_probability: bool = False,
) -> Proposal:
    """Draw a token at every position of `logits` (batch, window, vocab) and score it.

    Tokens: greedy at temperature 0; otherwise Gumbel-max sampling with float64 noise on `logits / temperature`
    (LLaDA's `add_gumbel_noise`). top_k / top_p restrict the candidates (decided on the tempered logits).
    Confidence (from the filtered, untempered distribution p):
    `low_confidence`/`maskgit_plus`/`confidence_threshold`: p(token); `topk_margin`: top-1 minus top-2 of p;
    `entropy`: sum p log p (negative entropy); `random`: uniform; `origin`: none (zeros, positions are random).
    `confidence_excluded_ids` (LLaDA's `confidence_eos_eot_inf`) are removed from p after the token is drawn, so a
    proposed EOS/EoT gets confidence 0.
    `never_drawn_ids` (the mask id: a committed mask would stay masked, and the loop would never end) are never
    drawn; they still count in the confidence distribution, so any step whose argmax is not among them matches the
    references bitwise.
    `probability` is p(token) under the same distribution; it is computed for every scorer but `random` and
    `origin`, and for those too with `need_probability` (caches that read it, such as d2Cache).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if top_k is not None or (top_p is not None and top_p < 1):
        tempered = logits / temperature if temperature > 0 else logits
        kept = filter_top_k_top_p(tempered, top_k, top_p) > torch.finfo(logits.dtype).min
        logits = logits.masked_fill(~kept, torch.finfo(logits.dtype).min)
    drawn = logits if never_drawn_ids is None else logits.index_fill(-1, never_drawn_ids, NEG_INF)
    if temperature > 0:
        uniform = torch.rand(logits.shape, dtype=torch.float64, device=logits.device)
        tokens = (drawn.to(torch.float64) - temperature * torch.log(-torch.log(uniform))).argmax(-1)
    else:
        tokens = drawn.argmax(-1)

    if alg in ("random", "origin"):
        confidence = (torch.rand(tokens.shape, device=tokens.device) if alg == "random"
                      else torch.zeros(tokens.shape, device=tokens.device))
        probability = None
        if need_probability:
            if confidence_excluded_ids is not None:
                logits = logits.index_fill(-1, confidence_excluded_ids, NEG_INF)
            probability = logits.softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return Proposal(tokens, confidence, probability)
    if confidence_excluded_ids is not None:
        logits = logits.index_fill(-1, confidence_excluded_ids, NEG_INF)
    probs = logits.softmax(-1)
    probability = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    elif alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    else:  # low_confidence, maskgit_plus, confidence_threshold
        confidence = probability
    return Proposal(tokens, confidence, probability)


# ---------------------------------------------------------------------------------------------------- policies
@dataclass
class StepContext:
    step: int  # 0-based step index inside the current block
    count: torch.Tensor  # (batch,) the schedule's number of positions to commit
    remaining: torch.Tensor  # (batch,) eligible masks before this step
    schedule: LinearSchedule | EpsSchedule  # for policies that need more than the count (origin)
    entropy: torch.Tensor | None = None  # (batch, window) entropies, for policies with `needs_entropy`


def descending_ranks(confidence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted confidences and each position's 0-based rank in descending order (ties: lower index first)."""
    sorted_conf, order = torch.sort(confidence, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return sorted_conf, ranks


class CommitPolicy:
    """Chooses the positions to commit. `confidence` holds -inf at ineligible positions."""

    needs_entropy = False  # the step computes `ctx.entropy` (the entropy of every window position's distribution)

    def begin_block(self, eligible: torch.Tensor, steps_in_block: int) -> None:
        pass

    def select(self, confidence: torch.Tensor, eligible: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError


class TopKPolicy(CommitPolicy):
    """The schedule's count of most confident positions (LLaDA, Dream)."""

    def select(self, confidence, eligible, ctx):
        _, ranks = descending_ranks(confidence)
        return eligible & (ranks < ctx.count[:, None])


class SampledTopKPolicy(CommitPolicy):
    """Dream's `alg_temp > 0`: positions drawn without replacement from softmax(confidence / alg_temp)."""

    def __init__(self, alg_temp: float):
        self.alg_temp = alg_temp

    def select(self, confidence, eligible, ctx):
        gumbel = -torch.log(-torch.log(torch.rand(confidence.shape, device=confidence.device)))
        perturbed = torch.where(eligible, confidence / self.alg_temp + gumbel, NEG_INF)
        _, ranks = descending_ranks(perturbed)
        return eligible & (ranks < ctx.count[:, None])


class ThresholdPolicy(CommitPolicy):
    """Fast-dLLM: every eligible position with confidence >= threshold (> threshold with `strict`, as Fast-dLLM v2
    and SDAR compare), and always the most confident one; with `at_least_count`, always the schedule's count of most
    confident ones (SDAR's `low_confidence_dynamic`)."""

    def __init__(self, threshold: float, strict: bool = False, at_least_count: bool = False):
        self.threshold, self.strict, self.at_least_count = threshold, strict, at_least_count

    def passes(self, confidence: torch.Tensor) -> torch.Tensor:
        return confidence > self.threshold if self.strict else confidence >= self.threshold

    def select(self, confidence, eligible, ctx):
        _, ranks = descending_ranks(confidence)
        floor = ranks < ctx.count.clamp_min(1)[:, None] if self.at_least_count else ranks == 0
        return eligible & (floor | self.passes(confidence))


class BudgetedThresholdPolicy(ThresholdPolicy):
    """Fast-dLLM Dream `alg="confidence_threshold"`: the threshold rule among the top-`budget` positions.

    The budget is the block's masks spread evenly over its steps, plus whatever earlier steps left unspent; from
    the last scheduled step on, it covers every remaining mask.
    """

    def begin_block(self, eligible, steps_in_block):
        self.steps = steps_in_block
        steps_done = torch.arange(1, steps_in_block + 1, device=eligible.device)  # (steps,)
        base, remainder = (eligible // steps_in_block)[:, None], (eligible % steps_in_block)[:, None]
        self.cumulative = base * steps_done + torch.minimum(remainder, steps_done)  # (batch, steps)
        self.start = eligible

    def select(self, confidence, eligible, ctx):
        if ctx.step >= self.steps - 1:
            budget = ctx.remaining
        else:
            budget = self.cumulative[:, ctx.step] - (self.start - ctx.remaining)
        _, ranks = descending_ranks(confidence)
        return eligible & (ranks < budget[:, None]) & ((ranks == 0) | self.passes(confidence))


class FactorPolicy(CommitPolicy):
    """Fast-dLLM factor decoding: the leading run of sorted confidences with c_r >= 1 - factor / (r + 1).

    Ranks r are 1-based over the row's eligible masks and rank 1 always passes. As in the reference, when the run
    reaches the last or second-to-last eligible mask, every eligible mask is committed (so two remaining masks are
    always committed together).
    """

    def __init__(self, factor: float):
        self.factor = factor

    def select(self, confidence, eligible, ctx):
        sorted_conf, ranks = descending_ranks(confidence)
        rank1 = torch.arange(1, confidence.shape[-1] + 1, device=confidence.device, dtype=sorted_conf.dtype)
        passes = sorted_conf >= 1 - self.factor / (rank1 + 1)
        passes[..., 0] = True
        leading = passes.long().cumprod(-1).sum(-1)
        count = torch.where(leading >= ctx.remaining - 1, ctx.remaining, leading)
        return eligible & (ranks < count[:, None])


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy (nats, float32) of each position's distribution softmax(`logits`) (..., vocab) -> (...)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).nan_to_num().sum(-1)


class EntropyBoundPolicy(CommitPolicy):
    """EB-Sampler (arXiv 2505.24857): the eligible positions in order of increasing entropy, as many as keep the sum
    of their entropies minus the largest (an upper bound on their mutual dependence) within `bound`; the lowest
    entropy one always passes. The same acceptance rule as transformers' `EntropyBoundSampler`, over the positions
    this step may commit."""

    needs_entropy = True

    def __init__(self, bound: float):
        self.bound = bound

    def select(self, confidence, eligible, ctx):
        entropy = torch.where(eligible, ctx.entropy, torch.inf)
        ordered, order = torch.sort(entropy, dim=-1, stable=True)
        # sorted ascending, so each prefix's largest entropy is its last one
        within = (ordered.cumsum(-1) - ordered <= self.bound) | (torch.arange(ordered.shape[-1], device=ordered.device) == 0)
        accepted = torch.zeros_like(within).scatter(-1, order, within)
        return eligible & accepted


class OriginPolicy(CommitPolicy):
    """Dream `alg="origin"`: every eligible mask is revealed independently with the schedule's probability."""

    def select(self, confidence, eligible, ctx):
        draw = torch.rand(confidence.shape, device=confidence.device)
        return eligible & (draw < ctx.schedule.reveal_fraction(ctx.step, ctx.remaining)[:, None])


class PolicyCommitRule:
    """The commit rule of an unguided call: the config's policy picks positions and the proposed tokens are written.

    A commit rule is what a denoising step asks which positions to commit, with which tokens (`choose`), and how
    positions the step must commit now are merged into that choice (`merge_forced`). AR guidance brings its own rule
    (`diffusion_guidance.ARGuide`), so the step is the same with and without a guide.
    """

    def __init__(self, policy: CommitPolicy):
        self.policy = policy

    def choose(self, canvas: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor, eligible: torch.Tensor,
               ctx: StepContext, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy.select(confidence, eligible, ctx), tokens

    def merge_forced(self, commit: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
        """A row with forced positions commits exactly those (its only chance to fill them), nothing else."""
        return torch.where(forced.any(-1, keepdim=True), forced, commit)


# ---------------------------------------------------------------------------------------------------- assembly
@dataclass
class Strategies:
    schedule: LinearSchedule | EpsSchedule
    policy: CommitPolicy
    alg: str


def build_strategies(config, strict_threshold: bool = False, threshold_at_least_count: bool = False) -> Strategies:
    """Turn a resolved `DiffusionGenerationConfig` into strategy objects (the only place strings are compared).
    `strict_threshold`: the model family's threshold rule commits confidence > threshold (Fast-dLLM v2, SDAR) rather
    than >= (Fast-dLLM v1); `threshold_at_least_count`: it commits at least the schedule's count (SDAR) rather than
    at least one."""
    schedule = LinearSchedule() if config.schedule == "linear" else EpsSchedule(config.eps)
    if config.alg == "origin":
        policy = OriginPolicy()
    elif config.alg == "confidence_threshold":
        policy = BudgetedThresholdPolicy(config.threshold, strict_threshold)
    elif config.threshold is not None:
        policy = ThresholdPolicy(config.threshold, strict_threshold, threshold_at_least_count)
    elif config.factor is not None:
        policy = FactorPolicy(config.factor)
    elif getattr(config, "entropy_bound", None) is not None:
        policy = EntropyBoundPolicy(config.entropy_bound)
    elif config.alg_temp:
        policy = SampledTopKPolicy(config.alg_temp)
    else:
        policy = TopKPolicy()
    return Strategies(schedule=schedule, policy=policy, alg=config.alg)
