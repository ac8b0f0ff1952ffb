"""An exact tabular policy: one free logit vector per node of the sequence tree.

Every distribution over the sample space (sequences of at most ``max_new_tokens`` tokens, ended by
EOS or by the length limit) is representable, so the family is well-specified: a training algorithm
that minimises a divergence to p* can reach 0, and tests can assert it exactly.

Nodes are the prefixes of non-EOS tokens of depth 0..L-1 (a prefix of depth L is a finished
sequence). The prefix (j_1..j_d), j_k in [0, n) the index of a token among the n = V-1 non-EOS
tokens, is node ``offset[d] + sum_k j_k n^(d-k)``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tiltlm.errors import TiltlmError
from tiltlm.policies.base import Samples, batch_rows, row_draw


class TabularPolicy(nn.Module):
    """pi(x | context) = prod_t softmax(table[context, node(x_<t)])[x_t]."""

    def __init__(
        self,
        vocab: list[str],
        *,
        eos: str = "<eos>",
        max_new_tokens: int = 3,
        contexts: tuple[str, ...] = ("",),
        logits: torch.Tensor | None = None,
        max_nodes: int = 2_000_000,
    ):
        super().__init__()
        if eos not in vocab:
            raise TiltlmError(f"EOS token {eos!r} is not in the vocabulary {vocab}; add it")
        if len(set(vocab)) != len(vocab):
            raise TiltlmError("the tabular vocabulary has duplicate tokens; make every token distinct")
        self.vocab = list(vocab)
        self.vocab_size = len(vocab)
        self.eos_id = self.vocab.index(eos)
        self.pad_id = self.eos_id
        self.max_new_tokens = int(max_new_tokens)
        self.contexts = tuple(contexts)
        n = self.vocab_size - 1
        self.n_free = n
        sizes = [n**d for d in range(self.max_new_tokens)]
        self.offsets = [sum(sizes[:d]) for d in range(self.max_new_tokens)]
        self.n_nodes = sum(sizes)
        if self.n_nodes * len(self.contexts) > max_nodes:
            raise TiltlmError(
                f"a tabular policy over {self.vocab_size} tokens and {self.max_new_tokens} steps needs {self.n_nodes} nodes; lower max_new_tokens or the vocabulary"
            )
        shape = (len(self.contexts), self.n_nodes, self.vocab_size)
        if logits is None:
            logits = torch.zeros(shape)
        if tuple(logits.shape) != shape:
            raise TiltlmError(f"tabular logits must have shape {shape} (contexts, nodes, vocab), got {tuple(logits.shape)}")
        self.logits = nn.Parameter(logits.detach().clone().float())
        # non-EOS token id -> its index j among the n free tokens; EOS -> -1
        free = torch.full((self.vocab_size,), -1, dtype=torch.long)
        free[[i for i in range(self.vocab_size) if i != self.eos_id]] = torch.arange(n)
        self.register_buffer("free_index", free, persistent=False)

    @classmethod
    def random(cls, vocab: list[str], *, seed: int, scale: float = 1.0, **kwargs) -> "TabularPolicy":
        """Logits drawn i.i.d. N(0, scale^2) from an explicit seed."""
        policy = cls(vocab, **kwargs)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            policy.logits.copy_(torch.randn(policy.logits.shape, generator=gen) * scale)
        return policy

    def copy(self) -> "TabularPolicy":
        return copy.deepcopy(self)

    def save(self, directory: str | Path) -> Path:
        """tabular.safetensors (the logit table) + tabular.json (vocabulary, EOS, length, contexts)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"logits": self.logits.detach().contiguous()}, str(directory / "tabular.safetensors"))
        meta = {"vocab": self.vocab, "eos": self.vocab[self.eos_id], "max_new_tokens": self.max_new_tokens, "contexts": list(self.contexts)}
        (directory / "tabular.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "TabularPolicy":
        directory = Path(directory)
        if not (directory / "tabular.json").is_file():
            raise TiltlmError(f"'{directory}' holds no tabular policy (tabular.json); pass a directory written by TabularPolicy.save")
        meta = json.loads((directory / "tabular.json").read_text())
        logits = load_file(str(directory / "tabular.safetensors"))["logits"]
        return cls(meta["vocab"], eos=meta["eos"], max_new_tokens=meta["max_new_tokens"], contexts=tuple(meta["contexts"]), logits=logits)

    def _context_index(self, context: str) -> int:
        try:
            return self.contexts.index(context)
        except ValueError:
            raise TiltlmError(f"context {context!r} is not one of this tabular policy's contexts {list(self.contexts)}") from None

    def _nodes(self, ids: torch.Tensor) -> torch.Tensor:
        """Node index of the prefix before each position, (B, T) -> (B, T). Positions after EOS get node 0."""
        b, t = ids.shape
        free = self.free_index[ids].clamp(min=0)  # (B, T)
        nodes = torch.zeros((b, t), dtype=torch.long)
        code = torch.zeros(b, dtype=torch.long)
        for d in range(min(t, self.max_new_tokens)):
            nodes[:, d] = self.offsets[d] + code
            code = code * self.n_free + free[:, d]
        return nodes

    # ---- the protocol ---------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, contexts: list[str], n: int, *, seed: int | None = None, rows: range | None = None) -> Samples:
        """n sequences per context; ``rows`` draws only those rows, each exactly as in the whole batch."""
        gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        group, rows = batch_rows(len(contexts), n, rows)
        draw = row_draw(gen, len(contexts) * n, rows)
        ctx_rows = torch.tensor([self._context_index(c) for c in contexts], dtype=torch.long)[group]
        b, length = group.shape[0], self.max_new_tokens
        ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        token_logp = torch.zeros((b, length))
        mask = torch.zeros((b, length), dtype=torch.bool)
        done = torch.zeros(b, dtype=torch.bool)
        code = torch.zeros(b, dtype=torch.long)
        for d in range(length):
            logp = torch.log_softmax(self.logits[ctx_rows, self.offsets[d] + code], dim=-1)  # (B, V)
            token = draw(logp)  # (B,)
            alive = ~done
            ids[:, d] = torch.where(alive, token, self.pad_id)
            token_logp[:, d] = torch.where(alive, logp.gather(-1, token[:, None]).squeeze(-1), 0.0)
            mask[:, d] = alive
            done = done | (token == self.eos_id)
            code = code * self.n_free + self.free_index[token].clamp(min=0)
        width = int(mask.sum(-1).max()) if b else 0
        ids, token_logp, mask = ids[:, :width], token_logp[:, :width], mask[:, :width]
        return Samples(
            contexts=list(contexts), group=group,
            context_ids=torch.zeros((b, 0), dtype=torch.long), context_attn=torch.zeros((b, 0), dtype=torch.bool),
            ids=ids, attn=mask.clone(), mask=mask, token_logp=token_logp,
            texts=self._texts(ids, mask), eos=((ids == self.eos_id) & mask).any(-1),
        )

    def log_prob(self, samples: Samples, *, grad: bool = False, per_token: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            ctx_rows = torch.tensor([self._context_index(c) for c in samples.contexts], dtype=torch.long)[samples.group]
            nodes = self._nodes(samples.ids)  # (B, T)
            logp = torch.log_softmax(self.logits[ctx_rows[:, None], nodes], dim=-1)  # (B, T, V)
            tok = logp.gather(-1, samples.ids[..., None]).squeeze(-1)
            token_logp = torch.where(samples.mask, tok, torch.zeros(()))
        return token_logp if per_token else token_logp.sum(-1)

    @torch.no_grad()
    def next_token_logprobs(self, context: str, prefixes: torch.Tensor) -> torch.Tensor:
        d = prefixes.shape[1]
        if d >= self.max_new_tokens:
            raise TiltlmError(f"prefix depth {d} is past max_new_tokens {self.max_new_tokens}")
        code = torch.zeros(prefixes.shape[0], dtype=torch.long)
        for k in range(d):
            code = code * self.n_free + self.free_index[prefixes[:, k]]
        return torch.log_softmax(self.logits[self._context_index(context), self.offsets[d] + code], dim=-1)

    def decode(self, ids: list[list[int]]) -> list[str]:
        return ["".join(self.vocab[i] for i in row if i != self.eos_id) for row in ids]

    def _texts(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return self.decode([[t for t, keep in zip(row, m) if keep] for row, m in zip(ids.tolist(), mask.tolist())])
