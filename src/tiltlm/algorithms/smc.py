"""Token-level sequential Monte Carlo (SMC) toward p* ∝ pi0·phi, with a policy q as the proposal.

N particles per context grow one token at a time from q; after each token a particle's weight is
multiplied by the incremental weight of the intermediate targets (docs/math.md §8.1)

    gamma_t(z) = pi0(z) psi(z)   z an unfinished prefix of t tokens (psi = 1 without a twist),
    gamma_t(x) = pi0(x) phi(x)   x a sequence finished (EOS or length limit) by step t,
    w_t = gamma_t(z_{1:t}) / (gamma_{t-1}(z_{1:t-1}) q(z_t | z_{<t})),  gamma_0 = psi(empty prefix),

i.e. pi0/q per token, the sequence-level potential phi = exp(r/beta)·1[constraints] when a particle
finishes, and psi_t/psi_{t-1} for an optional twist (a partial-reward look-ahead, `reward_twist`).
When the ESS of the weights falls below ``ess_threshold``·N the particles are resampled (systematic
or multinomial, seeded) and the weights reset; finished particles are carried along unchanged.

What it converges to (its fixed point as a baseline), for any twist that is > 0 on every prefix p*
can reach:
- the output — N draws from the final weighted particles — follows a distribution that tends to p*
  as N -> inf (bias O(1/N), like SIR's; `importance_resample` is the special case q = pi0, no twist);
- ``log_z``: Z_hat = prod over resampling epochs of mean_i(weights) is an unbiased estimate of Z, so
  E[log Z_hat] <= log Z (Jensen): a stochastic lower bound whose gap vanishes as N -> inf;
- conditional SMC (one particle pinned to a draw of p*) gives E[log Z_hat] >= log Z: the upper bound
  of `log_z_bounds` (bidirectional SMC; Zhao, Brekelmans, Makhzani, Grosse 2024). With N = 1 the two
  are the ELBO E_q[log P/q] and the EUBO E_p*[log P/q].

Cost: q.next_token_logprobs (and pi0's, unless q is pi0) on the live prefixes at every step — for HF
policies a forward over the whole prefix each step (no KV cache), about max_new_tokens times the cost
of one ``sample`` call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tiltlm.algorithms.inference import InferenceResult, _child_seed
from tiltlm.errors import TiltlmError
from tiltlm.metrics.divergences import Estimate, effective_sample_size
from tiltlm.policies.base import Policy
from tiltlm.records import Samples, concat
from tiltlm.targets.base import Target, _as_reward, rewards_of

RESAMPLING = ("systematic", "multinomial")

Twist = Callable[[Samples], torch.Tensor]
"""log psi of unfinished prefixes: Samples of prefixes (all of one length, possibly 0) -> (k,) float64."""


@dataclass
class SMCResult(InferenceResult):
    """`InferenceResult` (``log_z``: one run's log Z_hat per context, stderr NaN) plus resampling counts."""

    resamples: list[int] = field(default_factory=list)
    """Per context, how many times the particles were resampled before the end."""
    min_ess: list[float] = field(default_factory=list)
    """Per context, the smallest ESS of the weights seen after any token (before resampling)."""


def resample(log_w: torch.Tensor, n: int, scheme: str, generator: torch.Generator) -> torch.Tensor:
    """n ancestor indices (long) drawn with probabilities softmax(log_w).

    ``multinomial``: i.i.d. draws. ``systematic``: one u ~ U[0, 1) and the points (u + k)/n, k < n, read
    off the cumulative weights (Kitagawa 1996): each i gets floor or ceil of n·w_i copies, less noise.
    """
    w = torch.softmax(log_w.double(), 0)
    if scheme == "multinomial":
        return torch.multinomial(w, n, replacement=True, generator=generator)
    if scheme == "systematic":
        cdf = w.cumsum(0)
        u = (torch.rand(1, generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n * cdf[-1]
        return torch.searchsorted(cdf, u, right=True)  # u < cdf[-1]: never past the last positive weight
    raise TiltlmError(f"unknown resampling scheme {scheme!r}; use one of {', '.join(RESAMPLING)}")


def reward_twist(reward, beta: float) -> Twist:
    """The partial-reward twist log psi(z) = r(z)/beta: the reward (any `get_reward` spec) read on prefixes."""
    if not beta > 0:
        raise TiltlmError(f"the twist's beta must be > 0 (got {beta}); use the target's beta")
    r = _as_reward(reward)
    return lambda s: rewards_of(r, s).double() / float(beta)


def _check_policies(prior: Policy, q: Policy) -> None:
    if (q.vocab_size, q.eos_id, q.max_new_tokens) != (prior.vocab_size, prior.eos_id, prior.max_new_tokens):
        raise TiltlmError(
            f"the proposal (vocabulary {q.vocab_size}, EOS {q.eos_id}, max_new_tokens {q.max_new_tokens}) and the prior "
            f"({prior.vocab_size}, {prior.eos_id}, {prior.max_new_tokens}) must share the tokenizer and the length limit"
        )


def _samples(q: Policy, contexts: list[str], g: int, ids: torch.Tensor, mask: torch.Tensor, token_lq: torch.Tensor) -> Samples:
    """Samples of context g from (k, d) particle arrays; token_logp = log q. Context tokens are added later."""
    k = ids.shape[0]
    # texts without the EOS token, as every sampler writes them (an HF tokenizer would spell it out)
    texts = q.decode([[t for t, m in zip(row, mrow) if m and t != q.eos_id] for row, mrow in zip(ids.tolist(), mask.tolist())])
    return Samples(
        contexts=list(contexts), group=torch.full((k,), g, dtype=torch.long),
        context_ids=torch.zeros((k, 0), dtype=torch.long), context_attn=torch.zeros((k, 0), dtype=torch.bool),
        ids=ids.clone(), attn=mask.clone(), mask=mask.clone(), token_logp=token_lq.float(),
        texts=texts, eos=((ids == q.eos_id) & mask).any(-1),
    )


@dataclass
class _Run:
    ids: torch.Tensor  # (N, T) long, pad after the end
    mask: torch.Tensor  # (N, T) bool
    token_lq: torch.Tensor  # (N, T) float64, log q per token
    log_w: torch.Tensor  # (N,) float64, weights since the last resampling
    log_z: float
    resamples: int
    min_ess: float


def _run(
    target: Target, q: Policy, contexts: list[str], g: int, n: int, gen: torch.Generator, *,
    ess_threshold: float, scheme: str, twist: Twist | None, reference: Samples | None,
) -> _Run:
    """One SMC run for context g; with ``reference`` (one sequence) particle 0 is pinned to it (conditional SMC)."""
    context, prior = contexts[g], target.prior
    t_max, pad = q.max_new_tokens, getattr(q, "pad_id", q.eos_id)
    ids = torch.full((n, t_max), pad, dtype=torch.long)
    mask = torch.zeros((n, t_max), dtype=torch.bool)
    token_lq = torch.zeros((n, t_max), dtype=torch.float64)
    done = torch.zeros(n, dtype=torch.bool)
    log_psi = torch.zeros(n, dtype=torch.float64)  # log psi of each particle's current prefix (phi once finished)
    if twist is not None:
        empty = _samples(q, contexts, g, ids[:1, :0], mask[:1, :0], token_lq[:1, :0])
        log_psi[:] = float(torch.as_tensor(twist(empty), dtype=torch.float64).reshape(-1)[0])
    log_w, log_z, resamples, min_ess = log_psi.clone(), 0.0, 0, float(n)  # gamma_0 = psi(empty prefix)
    ref = None
    if reference is not None:
        ref = reference.ids[0][reference.mask[0]]  # (L,) the pinned sequence's tokens
    for d in range(t_max):
        alive = (~done).nonzero().squeeze(-1)  # every live particle has exactly d tokens
        if alive.numel() == 0:
            break
        prefixes = ids[alive, :d]
        lq = q.next_token_logprobs(context, prefixes).double()  # (k, V)
        lp0 = lq if q is prior else prior.next_token_logprobs(context, prefixes).double()
        tok = torch.multinomial(lq.exp(), 1, generator=gen).squeeze(-1)  # (k,)
        if ref is not None and not done[0]:  # alive[0] == 0: the pinned particle follows the reference
            tok[0] = ref[d]
        rows = torch.arange(len(alive))
        ids[alive, d], mask[alive, d] = tok, True
        token_lq[alive, d] = lq[rows, tok]
        inc = lp0[rows, tok] - lq[rows, tok] - log_psi[alive]  # (k,) pi0/q and the previous twist
        dead = torch.isneginf(log_w[alive])  # zero weight already (a constraint or a zero twist): stays zero
        ends = (tok == q.eos_id) | (d == t_max - 1)
        new_psi = torch.zeros(len(alive), dtype=torch.float64)
        if ends.any():  # finished: the sequence-level potential phi
            f = alive[ends]
            new_psi[ends] = target.log_potential(_samples(q, contexts, g, ids[f, : d + 1], mask[f, : d + 1], token_lq[f, : d + 1])).double()
        if twist is not None and (~ends).any():
            u = alive[~ends]
            new_psi[~ends] = torch.as_tensor(twist(_samples(q, contexts, g, ids[u, : d + 1], mask[u, : d + 1], token_lq[u, : d + 1])),
                                             dtype=torch.float64).reshape(-1)
        log_psi[alive] = new_psi
        log_w[alive] += torch.where(dead, 0.0, inc + new_psi)
        done[alive] |= ends
        if not torch.isfinite(log_w).any() or torch.isnan(log_w).any() or torch.isposinf(log_w).any():
            raise TiltlmError(
                f"the SMC weights of context {context!r} became {'all zero' if not torch.isfinite(log_w).any() else 'NaN or infinite'} "
                f"after {d + 1} tokens: no particle has positive target mass (or the proposal gives a target sequence probability 0); "
                "use more particles, a proposal that covers the target, or loosen the constraint"
            )
        ess = effective_sample_size(log_w)
        min_ess = min(min_ess, ess)
        if ess < ess_threshold * n and d < t_max - 1 and not done.all():
            log_z += float(torch.logsumexp(log_w, 0)) - math.log(n)
            if ref is None:
                anc = resample(log_w, n, scheme, gen)
            else:  # conditional SMC: the others are drawn i.i.d. (multinomial), the pinned particle keeps its line
                anc = torch.cat([torch.zeros(1, dtype=torch.long), resample(log_w, n - 1, "multinomial", gen)])
            ids, mask, token_lq, done, log_psi = ids[anc], mask[anc], token_lq[anc], done[anc], log_psi[anc]
            log_w = torch.zeros(n, dtype=torch.float64)
            resamples += 1
    log_z += float(torch.logsumexp(log_w, 0)) - math.log(n)
    return _Run(ids, mask, token_lq, log_w, log_z, resamples, min_ess)


def _check(n: int, ess_threshold: float, scheme: str) -> None:
    if int(n) < 1:
        raise TiltlmError(f"SMC needs at least 1 particle per context (got {n})")
    if not 0 <= ess_threshold <= 1:
        raise TiltlmError(f"ess_threshold is a fraction of the particles in [0, 1] (got {ess_threshold}); 0 never resamples (IS), 1 always")
    if scheme not in RESAMPLING:
        raise TiltlmError(f"unknown resampling scheme {scheme!r}; use one of {', '.join(RESAMPLING)}")


def smc(
    target: Target,
    proposal: Policy | None,
    contexts: list[str],
    n_particles: int,
    seed: int,
    *,
    n_out: int | None = None,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
    twist: Twist | None = None,
) -> SMCResult:
    """Token-level SMC with ``n_particles`` per context from ``proposal`` (default the prior pi0).

    Returns ``n_out`` (default ``n_particles``) unweighted draws per context from the final weighted
    particles (same scheme), the log Z_hat of the run per context, the final ESS and the resampling
    counts. ``ess_threshold`` 0 never resamples: then it is importance sampling with q, token by token,
    and with q = pi0 and no twist exactly SIR (`importance_resample`); with resampling and q = pi0 the
    weights still change only as particles finish, so without a twist SMC can beat SIR only through q.
    Selected rows keep ``token_logp`` = log q, as in tiltlm.algorithms.inference.
    """
    q = target.prior if proposal is None else proposal
    _check(n_particles, ess_threshold, resampling)
    _check_policies(target.prior, q)
    n, n_out = int(n_particles), int(n_out if n_out is not None else n_particles)
    if n_out < 1:
        raise TiltlmError(f"n_out must be >= 1 (got {n_out})")
    contexts = list(contexts)
    parts, ess, log_z, resamples, min_ess = [], [], [], [], []
    for g in range(len(contexts)):
        gen = torch.Generator().manual_seed(_child_seed(seed, f"smc/{g}"))
        run = _run(target, q, contexts, g, n, gen, ess_threshold=ess_threshold, scheme=resampling, twist=twist, reference=None)
        pick = resample(run.log_w, n_out, resampling, gen)
        parts.append(_samples(q, contexts, g, run.ids[pick], run.mask[pick], run.token_lq[pick]))
        final_ess = effective_sample_size(run.log_w)
        ess.append(final_ess)
        log_z.append(Estimate(run.log_z, math.nan, n, final_ess))
        resamples.append(run.resamples)
        min_ess.append(run.min_ess)
    samples = _with_context_tokens(q, concat(parts, getattr(q, "pad_id", q.eos_id)))
    return SMCResult(samples, n * len(contexts), n_out / n, ess, log_z, resamples, min_ess)


def _with_context_tokens(q: Policy, s: Samples) -> Samples:
    """Give the rows their context tokens (HF policies), so the policy can re-score them; width trimmed to the longest row."""
    width = int(s.mask.sum(-1).max()) if len(s) else 0
    s.ids, s.attn, s.mask, s.token_logp = s.ids[:, :width], s.attn[:, :width], s.mask[:, :width], s.token_logp[:, :width]
    tensor = getattr(q, "contexts_tensor", None)
    if tensor is not None:
        s.context_ids, s.context_attn = tensor(s.contexts, s.group)
    return s


# ---- bounds on log Z ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogZBounds:
    """Stochastic bounds on log Z for one context, each the mean over independent runs with a 95% interval.

    ``lower``: mean of SMC's log Z_hat, whose expectation is <= log Z. ``upper``: mean of conditional
    SMC's log Z_hat with the pinned particle drawn from p*, whose expectation is >= log Z; None without
    a sampler of p*. Both intervals cover the expectations, not log Z: log Z lies (in expectation) in
    [lower, upper], and the gap shrinks to 0 as the particles grow.
    """

    lower: Estimate
    upper: Estimate | None
    runs: int


def _over_runs(values: list[float], n: int) -> Estimate:
    v = torch.tensor(values, dtype=torch.float64)
    se = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return Estimate(float(v.mean()), se, n, float(len(v)))


def log_z_bounds(
    target: Target,
    proposal: Policy | None,
    context: str,
    n_particles: int,
    runs: int,
    seed: int,
    *,
    posterior: Callable[[int, int], Samples] | None = None,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
    twist: Twist | None = None,
) -> LogZBounds:
    """Lower (SMC) and upper (conditional SMC) bounds on log Z(context) from ``runs`` independent runs each.

    ``posterior(k, seed)`` returns k sequences of ``context`` drawn from p* — exactly (`exact_posterior`
    on an enumerable space, or rejection sampling with beta_qrs >= max P/q) for an honest upper bound.
    Draws from an approximation (e.g. ``smc(...).samples``) give a number that is not a bound: pinning
    sequences that p* under-represents relative to the approximation biases it by an unknown amount,
    either way (docs/math.md §8.3).
    """
    q = target.prior if proposal is None else proposal
    _check(n_particles, ess_threshold, resampling)
    _check_policies(target.prior, q)
    runs, n = int(runs), int(n_particles)
    if runs < 1:
        raise TiltlmError(f"runs must be >= 1 (got {runs}); use >= 2 for an interval")
    options = {"ess_threshold": ess_threshold, "scheme": resampling, "twist": twist}
    lower = []
    for k in range(runs):
        gen = torch.Generator().manual_seed(_child_seed(seed, f"smc-lower/{k}"))
        lower.append(_run(target, q, [context], 0, n, gen, reference=None, **options).log_z)
    upper = None
    if posterior is not None:
        refs = posterior(runs, _child_seed(seed, "posterior"))
        if len(refs) != runs:
            raise TiltlmError(f"the posterior sampler returned {len(refs)} sequences for {runs} runs; it must return exactly one per run")
        values = []
        for k in range(runs):
            gen = torch.Generator().manual_seed(_child_seed(seed, f"smc-upper/{k}"))
            values.append(_run(target, q, [context], 0, n, gen, reference=refs.select([k]), **options).log_z)
        upper = _over_runs(values, n)
    return LogZBounds(_over_runs(lower, n), upper, runs)


def exact_posterior(target: Target, context: str = "") -> Callable[[int, int], Samples]:
    """A sampler ``(k, seed) -> Samples`` of exact p*(.|context), by enumerating pi0's space (small spaces only)."""
    from tiltlm.exact import enumerate_space, normalise

    space = enumerate_space(target.prior, context=context)
    log_p, _ = normalise(target.log_score(space.samples, prior_logp=space.logp))

    def draw(k: int, seed: int) -> Samples:
        gen = torch.Generator().manual_seed(int(seed))
        return space.samples.select(torch.multinomial(log_p.exp(), int(k), replacement=True, generator=gen))

    return draw


__all__ = ["RESAMPLING", "LogZBounds", "SMCResult", "Twist", "exact_posterior", "log_z_bounds", "resample", "reward_twist", "smc"]
