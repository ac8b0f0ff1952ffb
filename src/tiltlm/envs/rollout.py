"""Multi-turn rollouts: many episodes at once, one batched policy call per turn, one Samples out.

The trajectory of an episode is the token sequence

    [prompt] o_0  a_1  o_1  a_2  o_2 ... a_K          (o_t environment tokens, a_t policy tokens)

stored as a ``Samples`` row: ``context_ids`` holds the prompt, ``ids`` everything after it with
``attn`` True on every real token and ``mask`` True on policy tokens only. So log pi(tau) and every
KL sum over the policy's own tokens, p_env never enters a ratio (it cancels, docs/math.md §5), and a
gradient can never reach an observation. ``turn`` gives each token's turn (its action's index; the
reset observation is turn 0) so KL(pi||pi0) can be reported per turn.

Randomness is per episode: episode i of a call with seed s draws its actions from the generator
``episode_seed(s, i)`` and its environment noise from ``env.episode(seed=episode_seed(s, i))``, so
an episode is the same whichever batch (or worker) it is rolled out in.

Where the episodes run is the ``runner``'s business: ``LocalEpisodes`` (the default) calls the
environment in this process; ``tiltlm.distributed.RayEpisodes`` plays each episode on a Ray actor
that owns its own copy of the environment. Either way the policy generates here, batched, and the
runner only resets and steps episodes, so the trajectories are the same for the same seed.
"""

from __future__ import annotations

from typing import Any

import torch

from tiltlm.envs.base import EnvFault, Trajectory, call_with_timeout, clean_observation, clean_step
from tiltlm.errors import TiltlmError
from tiltlm.policies.base import Samples


def episode_seed(seed: int, index: int) -> int:
    """The seed of episode ``index`` of a rollout call seeded ``seed`` (fits a torch generator)."""
    return (seed * 1_000_003 + index * 7_919 + 17) % (2**62)


# What a runner returns per episode: (observation or StepResult, failure reason or None, notes).
Outcome = tuple[Any, "str | None", list[str]]


def reset_episode(env, live: dict, i: int, seed: int, task: str, timeout_s: float | None, max_chars: int) -> Outcome:
    """Start episode ``i`` (kept in ``live``) and return its cleaned first observation; faults are contained."""
    notes: list[str] = []
    try:
        live[i] = call_with_timeout(lambda: env.episode(seed=seed), timeout_s)
        obs = call_with_timeout(lambda: live[i].reset(task), timeout_s)
        return clean_observation(obs, max_chars, notes), None, notes
    except EnvFault as e:
        return None, f"reset {e}", notes


def step_episode(live: dict, i: int, action: str, turn: int, timeout_s: float | None, max_chars: int) -> Outcome:
    """Step episode ``i`` with ``action``; the cleaned StepResult, or the fault that ended the episode."""
    notes: list[str] = []
    try:
        result = call_with_timeout(lambda: live[i].step(action), timeout_s)
        return clean_step(result, max_chars, notes), None, notes
    except EnvFault as e:
        return None, f"step {turn} {e}", notes


class LocalEpisodes:
    """Plays a rollout's episodes in this process, one env call after another."""

    def __init__(self, env):
        self.env = env
        self.live: dict[int, Any] = {}

    def reset(self, items: list[tuple[int, int, str]], *, timeout_s: float | None, max_chars: int) -> list[Outcome]:
        """items: (episode index, episode seed, task) each; starts a fresh set of episodes."""
        self.live = {}
        return [reset_episode(self.env, self.live, i, s, task, timeout_s, max_chars) for i, s, task in items]

    def step(self, items: list[tuple[int, str]], turn: int, *, timeout_s: float | None, max_chars: int) -> list[Outcome]:
        """items: (episode index, action text) each."""
        return [step_episode(self.live, i, action, turn, timeout_s, max_chars) for i, action in items]


class _Histories:
    """Everything after the prompt of each of a rollout's b episodes, token by token: ids, which are the
    policy's, their log-probs under the sampler and their turn; observations are cut to fit the model window."""

    def __init__(self, policy, prompt: list[int], trajs: list, *, max_action_tokens: int, max_observation_tokens: int):
        self.policy, self.prompt, self.trajs = policy, prompt, trajs
        self.window = getattr(policy, "window", None)
        self.max_action_tokens, self.max_observation_tokens = max_action_tokens, max_observation_tokens
        b = len(trajs)
        self.tokens: list[list[int]] = [[] for _ in range(b)]
        self.is_policy: list[list[bool]] = [[] for _ in range(b)]
        self.logps: list[list[float]] = [[] for _ in range(b)]
        self.turn_of: list[list[int]] = [[] for _ in range(b)]

    def prefix(self, i: int) -> list[int]:
        return self.prompt + self.tokens[i]

    def add(self, i: int, ids: list[int], turn: int, *, policy: bool, logps: list[float] | None = None) -> None:
        self.tokens[i] += ids
        self.is_policy[i] += [policy] * len(ids)
        self.logps[i] += logps if logps is not None else [0.0] * len(ids)
        self.turn_of[i] += [turn] * len(ids)

    def add_observation(self, i: int, text: str, turn: int) -> None:
        ids = list(self.policy.encode_text(text))[: self.max_observation_tokens] if text else []
        if self.window is not None and len(self.prompt) + len(self.tokens[i]) + len(ids) + self.max_action_tokens > self.window:
            # the model's window cannot hold this observation and another action: end here, no fault
            self.trajs[i].done = self.trajs[i].truncated = True
            self.trajs[i].notes.append(f"model window of {self.window} tokens full")
            return
        self.add(i, ids, turn, policy=False)

    def to_samples(self, group: torch.Tensor, tasks: list[str]) -> Samples:
        b, trajs = len(self.trajs), self.trajs
        width = max((len(t) for t in self.tokens), default=0)
        pad = getattr(self.policy, "pad_id", self.policy.eos_id)
        ids = torch.full((b, width), pad, dtype=torch.long)
        attn = torch.zeros((b, width), dtype=torch.bool)
        mask = torch.zeros((b, width), dtype=torch.bool)
        token_logp = torch.zeros((b, width))
        turn = torch.full((b, width), -1, dtype=torch.long)
        for i in range(b):
            n = len(self.tokens[i])
            if n:
                ids[i, :n] = torch.tensor(self.tokens[i], dtype=torch.long)
                attn[i, :n] = True
                mask[i, :n] = torch.tensor(self.is_policy[i], dtype=torch.bool)
                token_logp[i, :n] = torch.tensor(self.logps[i])
                turn[i, :n] = torch.tensor(self.turn_of[i], dtype=torch.long)
        context_ids = torch.tensor([self.prompt] * b, dtype=torch.long).reshape(b, len(self.prompt))
        return Samples(
            contexts=list(tasks), group=group, context_ids=context_ids, context_attn=torch.ones_like(context_ids, dtype=torch.bool),
            ids=ids, attn=attn, mask=mask, token_logp=token_logp,
            texts=["\n".join(t.actions) for t in trajs],  # the policy's words: diversity of queries / questions
            eos=torch.tensor([t.done and not t.truncated for t in trajs], dtype=torch.bool),
            turn=turn, trajectories=trajs,
        )


def rollout(
    policy,
    env,
    tasks: list[str],
    n: int,
    *,
    seed: int,
    max_action_tokens: int = 16,
    timeout_s: float | None = 10.0,
    max_observation_chars: int = 2000,
    max_observation_tokens: int = 256,
    episodes: range | None = None,
    runner=None,
) -> Samples:
    """Play ``n`` episodes of each task with ``policy``; rows grouped task by task.

    The policy must provide ``encode_context(prompt)``, ``encode_text(observation)``,
    ``generate(prefixes, max_new_tokens=, seeds=)`` and ``decode`` (HFPolicy and TabularEnvPolicy do).
    ``episodes`` plays only that contiguous range of the len(tasks)·n episodes (a data-parallel
    shard), each exactly as in the full call; ``runner`` says where the env calls run (module docstring).
    """
    if not tasks:
        raise TiltlmError(f"environment '{env.name}' has no tasks to play; give it at least one task")
    group = torch.arange(len(tasks)).repeat_interleave(n)
    index = list(range(int(group.shape[0]))) if episodes is None else list(episodes)
    if not index or index[0] < 0 or index[-1] >= len(group):
        raise TiltlmError(f"episodes {episodes} is not a non-empty part of the {len(group)} episodes of this rollout")
    group = group[index]
    runner = LocalEpisodes(env) if runner is None else runner
    prompt = list(policy.encode_context(env.prompt))
    window = getattr(policy, "window", None)
    if window is not None and len(prompt) + max_action_tokens > window:
        raise TiltlmError(f"the prompt of {len(prompt)} tokens + max_action_tokens {max_action_tokens} exceeds the model's window of {window}; shorten the prompt or lower env.max_action_tokens")
    seeds = [episode_seed(seed, i) for i in index]
    trajs = [Trajectory(task=tasks[g]) for g in group.tolist()]
    history = _Histories(policy, prompt, trajs, max_action_tokens=max_action_tokens, max_observation_tokens=max_observation_tokens)
    limits = {"timeout_s": timeout_s, "max_chars": max_observation_chars}
    outcomes = runner.reset([(i, seeds[i], trajs[i].task) for i in range(len(trajs))], **limits)
    for i, (obs, fault, notes) in enumerate(outcomes):
        trajs[i].notes += notes
        if fault is not None:
            trajs[i].failure, trajs[i].done = fault, True
            continue
        trajs[i].observations.append(obs)
        history.add_observation(i, obs, 0)
    _play_turns(policy, env, runner, history, seeds, max_action_tokens, limits)
    for t in trajs:
        if not t.done:
            t.done = t.truncated = True
    return history.to_samples(group, tasks)


def _play_turns(policy, env, runner, history: _Histories, seeds: list[int], max_action_tokens: int, limits: dict) -> None:
    """Turns 1 … env.max_turns: the policy acts in every live episode (one batched call), the runner steps them."""
    trajs = history.trajs
    # a policy with sessions (HFPolicy) keeps each episode's KV cache from turn to turn: a turn encodes
    # only the new observation (and the last action token) instead of the prompt and whole history
    session = policy.session() if hasattr(policy, "session") else None
    any_rank = getattr(policy, "any_rank", bool)  # sharded weights: turns go on while any rank has episodes
    for turn in range(1, env.max_turns + 1):
        active = [i for i in range(len(trajs)) if not trajs[i].done]
        if not any_rank(bool(active)):
            break
        prefixes, turn_seeds = [history.prefix(i) for i in active], [seeds[i] * 131 + turn for i in active]
        if session is not None:
            ids, token_logp, mask = session.generate(active, prefixes, max_new_tokens=max_action_tokens, seeds=turn_seeds)
        else:
            ids, token_logp, mask = policy.generate(prefixes, max_new_tokens=max_action_tokens, seeds=turn_seeds)
        if not active:  # (a policy in lockstep has joined the other ranks' forward passes)
            continue
        actions = []
        for k, i in enumerate(active):
            row = ids[k][mask[k]].tolist()
            history.add(i, row, turn, policy=True, logps=token_logp[k][mask[k]].tolist())
            text_ids = row[:-1] if row and row[-1] == policy.eos_id else row
            actions.append(policy.decode([text_ids])[0])
        outcomes = runner.step(list(zip(active, actions)), turn, **limits)
        for i, action, outcome in zip(active, actions, outcomes):
            _record_step(history, i, action, outcome, turn, env.max_turns)


def _record_step(history: _Histories, i: int, action: str, outcome: Outcome, turn: int, max_turns: int) -> None:
    """What one step of episode i returned: its reward, info and next observation, or the fault that ended it."""
    result, fault, notes = outcome
    t = history.trajs[i]
    t.actions.append(action)
    t.notes += notes
    if fault is not None:
        t.rewards.append(0.0)
        t.infos.append({})
        t.failure, t.done = fault, True
        return
    t.rewards.append(result.reward)
    t.infos.append(result.info)
    t.observations.append(result.observation)
    if result.done:
        t.done = True
        t.truncated = bool(result.info.get("truncated", False))  # an env that ends episodes at its own limit
    elif turn == max_turns:
        t.done = t.truncated = True
    else:
        history.add_observation(i, result.observation, turn)
