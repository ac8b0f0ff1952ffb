"""The exact policy of a tabular environment (tiltlm.envs.tabular.TabularEnv).

``TabularEnvPolicy`` has one free logit vector per history, so every policy q(a|h) is representable
and training can be checked against tiltlm.exact.mdp's optima. As tokens, a trajectory is
[start] a_1 o_1 a_2 o_2 ... (start and observations are env tokens).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tiltlm.errors import TiltlmError
from tiltlm.policies.base import Samples, seeded_draw

if TYPE_CHECKING:  # tiltlm.envs imports tiltlm.policies: the env class is imported where it is needed
    from tiltlm.envs.tabular import TabularEnv


class TabularEnvPolicy(nn.Module):
    """q(a | h) = softmax(logits[node(h)]): one free logit vector per history of a TabularEnv."""

    max_new_tokens = 1
    window = None

    def __init__(self, env: TabularEnv, logits: torch.Tensor | None = None):
        super().__init__()
        self.env = env
        shape = (len(env.histories), len(env.actions))
        logits = torch.zeros(shape) if logits is None else logits
        if tuple(logits.shape) != shape:
            raise TiltlmError(f"tabular env policy logits must have shape {shape} (histories, actions), got {tuple(logits.shape)}")
        self.logits = nn.Parameter(logits.detach().clone().float())
        self.vocab_size = len(env.vocab)
        self.eos_id = -1  # an action is exactly one token; nothing ends a turn early
        self.pad_id = 0
        self.n_actions = len(env.actions)

    # ---- tokens ----------------------------------------------------------------------------
    def encode_context(self, prompt: str) -> list[int]:
        return []

    def encode_text(self, text: str) -> list[int]:
        try:
            return [self.env.vocab.index(text)]
        except ValueError:
            raise TiltlmError(f"observation {text!r} is not a token of this tabular environment") from None

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [" ".join(self.env.vocab[i] for i in row) for row in ids]

    def _node(self, prefix: list[int]) -> int:
        """Node of the history a prefix [start, a, o, a, o, ...] has reached."""
        a0, o0 = 1, 1 + self.n_actions
        pairs = tuple((prefix[k] - a0, prefix[k + 1] - o0) for k in range(1, len(prefix) - 1, 2))
        return self.env.node[pairs]

    # ---- the policy --------------------------------------------------------------------------
    def log_action_probs(self) -> torch.Tensor:
        """log q(a | h) for every history, (n_histories, A), detached (for exact computations)."""
        return torch.log_softmax(self.logits.detach(), dim=-1)

    @torch.no_grad()
    def generate(self, prefixes: list[list[int]], *, max_new_tokens: int = 1, seeds: list[int]):
        """One action token per prefix, drawn from the row's own generator (inverse CDF)."""
        rows = torch.tensor([self._node(p) for p in prefixes], dtype=torch.long)
        logp = torch.log_softmax(self.logits[rows], dim=-1)  # (b, A)
        a = seeded_draw(seeds)(logp)  # (b,)
        ids = (a + 1)[:, None]  # action tokens follow <start>
        return ids, logp.gather(-1, a[:, None]), torch.ones_like(ids, dtype=torch.bool)

    def log_prob(self, samples: Samples, *, grad: bool = False, per_token: bool = False) -> torch.Tensor:
        """log q(tau) = sum over policy tokens of log q(a_t | h_t): (B,), or (B, T) per token."""
        ids, mask = samples.ids, samples.mask
        where, nodes, actions = [], [], []
        for b, (row, m) in enumerate(zip(ids.tolist(), mask.tolist())):
            for t, is_action in enumerate(m):
                if is_action:
                    where.append((b, t))
                    nodes.append(self._node(row[:t]))
                    actions.append(row[t] - 1)
        with torch.set_grad_enabled(grad):
            token_logp = torch.zeros(ids.shape, dtype=self.logits.dtype)
            if where:
                logp = torch.log_softmax(self.logits[torch.tensor(nodes)], dim=-1).gather(-1, torch.tensor(actions)[:, None]).squeeze(-1)
                bi, ti = torch.tensor(where).T
                token_logp = token_logp.index_put((bi, ti), logp)
        return token_logp if per_token else token_logp.sum(-1)

    # ---- persistence -------------------------------------------------------------------------
    def copy(self) -> "TabularEnvPolicy":
        return copy.deepcopy(self)

    def save(self, directory: str | Path) -> Path:
        """tabular_env_policy.safetensors (logits) + tabular_env.json (the environment's options)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"logits": self.logits.detach().contiguous()}, str(directory / "tabular_env_policy.safetensors"))
        (directory / "tabular_env.json").write_text(json.dumps(self.env.options, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "TabularEnvPolicy":
        directory = Path(directory)
        if not (directory / "tabular_env.json").is_file():
            raise TiltlmError(f"'{directory}' holds no tabular environment policy; pass a directory written by TabularEnvPolicy.save")
        from tiltlm.envs.tabular import TabularEnv

        env = TabularEnv(**json.loads((directory / "tabular_env.json").read_text()))
        return cls(env, load_file(str(directory / "tabular_env_policy.safetensors"))["logits"])
