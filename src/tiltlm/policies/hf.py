"""Any Hugging Face causal LM as a tiltlm Policy (KV-cache sampling, exact log-probs).

Sampling is our own KV-cache loop rather than ``model.generate`` so that the log-prob recorded for
each sampled token is the log-prob of the distribution it was drawn from (temperature and top-p
included) — the same quantity ``log_prob`` recomputes — which importance ratios need exactly.
The model runs in eval mode (dropout off) so that log pi is a deterministic function of theta.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from tiltlm.errors import TiltlmError
from tiltlm.policies.base import Samples, batch_rows, check_sampler, check_sampling_options, row_draw, seeded_draw, transform_logits
from tiltlm.policies.kvcache import reserve
from tiltlm.policies.modeldir import check_loading_info, check_tokenizer, validate_model_dir
from tiltlm.priors import DEFAULT_MODEL_DIR, named_prior_dir  # noqa: F401 - DEFAULT_MODEL_DIR is re-exported
from tiltlm.quiet import quiet_transformers


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A named prior (``"default"``, the embedded LM; ``"smollm2-135m"``, …: tiltlm.priors) or a local
    save_pretrained directory. A name never contains a slash, so ``./smollm2-135m`` is a directory."""
    named = named_prior_dir(str(name_or_path))
    if named is not None:
        return named
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise TiltlmError(f"model directory '{path}' not found; pass a directory written by save_pretrained, or 'default'")
    if not (path / "config.json").is_file():
        if (path / "policy" / "config.json").is_file():  # a run directory: its trained policy is policy/
            raise TiltlmError(f"'{path}' is a run directory, not a model; pass its trained policy, '{path / 'policy'}'")
        if (path / "config.yaml").is_file() and (path / "checkpoint").exists():
            raise TiltlmError(f"'{path}' is a run directory whose policy/ is not written yet (the run has not finished); "
                              f"finish it with `tiltlm train {path / 'config.yaml'} --out {path} --resume`, then pass '{path / 'policy'}'")
        raise TiltlmError(f"'{path}' has no config.json; pass a directory written by save_pretrained (e.g. by `tiltlm testbed`)")
    return path


def load_model_and_tokenizer(name_or_path: str | Path, *, trust_remote_code: bool = False, trained_with: str | None = None):
    """Load a local causal LM and its tokenizer (safetensors only, no hub access), after validate_model_dir
    (tiltlm.policies.modeldir) has checked the directory without allocating the model. ``trained_with``: the
    optimiser ("adam", "sgd") when these weights will be trained in this process's memory (the memory check
    then counts gradients and optimiser state)."""
    path = resolve_model_dir(name_or_path)
    with quiet_transformers():  # no progress bars or advisory warnings (tiltlm.quiet)
        validate_model_dir(path, trained_with=trained_with, trust_remote_code=trust_remote_code)
        return _load(path, trust_remote_code=trust_remote_code)


def _load(path: Path, *, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad directory for the user
        raise TiltlmError(f"cannot load a tokenizer from '{path}' ({type(e).__name__}); save one there with tokenizer.save_pretrained") from e
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True
        )
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TiltlmError(f"cannot load a causal LM from '{path}' ({first}); it needs config.json and model.safetensors") from e
    check_loading_info(path, info)  # nothing randomly initialised or dropped
    check_tokenizer(tokenizer, int(model.get_output_embeddings().weight.shape[0]), model.config.eos_token_id)
    return model, tokenizer


def _plain_fast_decode(tokenizer) -> bool:
    """True when ``tokenizer.batch_decode`` (no clean-up) is exactly the Rust backend's ``decode_batch``."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    return isinstance(tokenizer, TokenizersBackend) and type(tokenizer)._decode is TokenizersBackend._decode and \
        type(tokenizer).batch_decode is TokenizersBackend.batch_decode and type(tokenizer).decode is TokenizersBackend.decode


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _cache_of(out):
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


class HFPolicy:
    """A causal LM with explicit sampling options; implements the Policy protocol.

    Contexts are tokenised with the tokenizer's special tokens, and the BOS token is prepended when
    the tokenizer has one and did not add it (``prepend_bos``): the context of an unconditional
    sample is then just BOS.

    ``chat_template`` (None = on when the tokenizer has one): a context is the user's message of a
    one-turn chat, encoded as ``apply_chat_template([{"role": "user", "content": context}],
    add_generation_prompt=True)`` and tokenised without adding special tokens again (the template
    writes its own; ``prepend_bos`` is not applied), so the sample space is the assistant's reply.
    ``Samples.contexts`` stay the raw prompts (rewards see the user's prompt). Every path that
    encodes a context (sample, log_prob, exact enumeration, environment rollouts, vLLM) goes
    through ``encode_context``.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        prepend_bos: bool = True,
        chunk_size: int = 2048,
        disable_adapters: bool = False,
        chat_template: bool | None = None,
        logits_chunk: int = 1 << 22,
        checkpoint_layers: bool = False,
        share_contexts: bool = True,
        sampler: str = "gumbel",
    ):
        check_sampling_options(temperature, top_p, max_new_tokens)
        self.sampler = check_sampler(sampler)  # how sample() draws from the stream (tiltlm.policies.base.SAMPLERS)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise TiltlmError("chat_template is on but the tokenizer has no chat template; turn it off (false) or leave it automatic (null)")
        self.chat_template = has_template if chat_template is None else bool(chat_template)
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.prepend_bos = prepend_bos
        self.chunk_size = chunk_size
        # scoring never holds more than this many float logits at once: (rows, V) blocks of max(1, logits_chunk // V)
        # tokens instead of the (B, T, V) logits of the whole batch (see _token_logp)
        self.logits_chunk = int(logits_chunk)
        # log_prob with grad keeps only each decoder layer's input and recomputes the layer in backward (activation
        # checkpointing): the step's activations are ~1/layers of them, for one more forward pass of the model
        self.checkpoint_layers = bool(checkpoint_layers)
        # log_prob without grad encodes each distinct context of a row chunk once and scores the rows' completions on
        # its cached keys and values (_shared_context_logp); False: every row's whole sequence, as with grad
        self.share_contexts = bool(share_contexts)
        # a LoRA prior: the same peft model with its adapters switched off for every forward pass,
        # so pi0 costs no second copy of the weights
        self.disable_adapters = disable_adapters
        # sharded weights (tiltlm.distributed.strategy.Fsdp): every forward is a collective, so ranks decode
        # until all are done and split their rows into equally many chunks; None: this process alone
        self.lockstep = None
        self.model.eval()
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_id = check_tokenizer(tokenizer, self.vocab_size, model.config.eos_token_id)  # ids within the vocabulary, an EOS
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id
        self._context_cache: dict[str, list[int]] = {}
        # transformers renamed `past_key_values` to `cache` during 5.x; accept both
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
        forward_params = inspect.signature(base.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        # only the last position's logits where the model can skip the others (sampling needs no more)
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "default", *, trust_remote_code: bool = False, **options) -> "HFPolicy":
        model, tokenizer = load_model_and_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, **options)

    def _adapters(self):
        """A LoRA prior's context: the adapters off (a plain model: nothing)."""
        return self.model.disable_adapter() if self.disable_adapters else contextlib.nullcontext()

    def _forward(self, **inputs):
        with self._adapters():
            return self.model(**inputs)

    def _scored_forward(self, score, **inputs) -> torch.Tensor:
        """One forward pass of the whole model with its LM head's work replaced by ``score``, which maps
        the final hidden states (b, L, d) the head would see to what the caller needs (not (b, L, V) logits).

        The same route for every architecture (and under peft or sharded weights): the model runs as it
        always does and calls its output embeddings, whose ``forward`` is ``score`` for this call, so
        sharded weights are gathered as in any forward pass and ``score``'s result is the model's output
        (``logits``), which backward enters as usual. A model that post-processes its logits (e.g.
        soft-capping) would return something else: that is refused rather than scored wrongly.
        """
        head = self.model.get_output_embeddings()
        patched = head.__dict__.get("forward")
        scored = []
        head.forward = lambda hidden: scored.append(score(hidden)) or scored[-1]
        try:
            out = self._forward(**inputs)
        finally:
            if patched is None:
                del head.forward
            else:
                head.forward = patched
        if len(scored) != 1 or out.logits is not scored[0]:
            raise TiltlmError(f"{type(self.model).__name__} does not return its output embeddings' result as its logits (it "
                              "post-processes them); tiltlm cannot score this model")
        return out.logits

    @contextlib.contextmanager
    def _checkpointed_layers(self):
        """Within: every decoder layer (transformers' GradientCheckpointingLayer) runs under
        ``torch.utils.checkpoint`` (non-reentrant), its ``forward`` only, so module hooks (sharding) run once;
        backward recomputes the layer from its saved input. The model stays in eval mode (no dropout), where
        transformers' own ``gradient_checkpointing_enable`` would not act. Callers pass ``use_cache=False``
        (a recomputed layer would write its keys and values into a cache twice)."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for layer in layers:
            layer.forward = functools.partial(_checkpointed, layer.forward)
        try:
            yield len(layers)
        finally:
            for layer in layers:
                del layer.forward

    def _token_logp(self, head, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log pi(token | hidden state) for n positions: (n, d), (n,) -> (n,), the sampling transform applied.
        ``head``: the output embeddings' own forward (called inside the model's forward, _scored_forward).

        The (n, V) logits are computed ``logits_chunk // V`` rows at a time and only each row's token
        log-prob is kept. With grad, each block is checkpointed: backward recomputes its logits (one more
        head matmul per token) instead of keeping all n x V of them, so the step's logit memory is one
        block's, not the batch's (B, T, V) float32 logits and their log-softmax.
        """

        def block(h, tok):  # (m, d), (m,) -> (m,)
            return transform_logits(head(h), self.temperature, self.top_p).gather(-1, tok[:, None]).squeeze(-1)

        rows = max(1, self.logits_chunk // self.vocab_size)
        if hidden.shape[0] <= rows:  # one block: nothing to save by recomputing it
            return block(hidden, tokens)
        # a LoRA prior's blocks are not recomputed: backward runs outside its adapters-off context (and it never trains)
        grad = torch.is_grad_enabled() and hidden.requires_grad and not self.disable_adapters
        parts = [checkpoint(block, h, tok, use_reentrant=False) if grad else block(h, tok)
                 for h, tok in zip(hidden.split(rows), tokens.split(rows))]
        return torch.cat(parts)

    def copy(self) -> "HFPolicy":
        """An independent copy (deep-copied weights, same tokenizer and sampling options)."""
        return HFPolicy(copy.deepcopy(self.model), self.tokenizer, max_new_tokens=self.max_new_tokens,
                        temperature=self.temperature, top_p=self.top_p, prepend_bos=self.prepend_bos, chunk_size=self.chunk_size,
                        disable_adapters=self.disable_adapters, chat_template=self.chat_template, logits_chunk=self.logits_chunk,
                        checkpoint_layers=self.checkpoint_layers, share_contexts=self.share_contexts, sampler=self.sampler)

    def save(self, directory: str | Path) -> Path:
        """A save_pretrained directory plain transformers can load (LoRA adapters merged into a copy)."""
        directory = Path(directory)
        model = self.model
        if hasattr(model, "merge_and_unload"):  # a peft model: save merged weights
            model = copy.deepcopy(model).merge_and_unload()
        with quiet_transformers():
            model.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
        return directory

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- contexts -------------------------------------------------------------------------
    def encode_context(self, context: str) -> list[int]:
        """The token ids a context is sampled after (cached): the chat-templated user turn, or the text
        with the tokenizer's special tokens and BOS (see the class docstring)."""
        if context not in self._context_cache:
            if self.chat_template:
                try:
                    text = self.tokenizer.apply_chat_template([{"role": "user", "content": context}], add_generation_prompt=True,
                                                              tokenize=False)
                except Exception as e:  # noqa: BLE001 - a template that raises (jinja) or is malformed
                    why = " ".join(str(e).split())[:200] or type(e).__name__
                    raise TiltlmError(f"the tokenizer's chat template cannot render the context {context[:40]!r} ({why}); "
                                      "fix the template or turn chat_template off") from None
            else:
                text = context
            try:
                ids = list(self.tokenizer(text, add_special_tokens=not self.chat_template)["input_ids"]) if text else []
            except Exception as e:  # noqa: BLE001 - e.g. a WordLevel tokenizer without [UNK] meets an unknown character
                why = " ".join(str(e).split())[:200] or type(e).__name__
                raise TiltlmError(f"the tokenizer cannot encode the context {context[:40]!r} ({why}); use only text in the model's vocabulary") from None
            bos = self.tokenizer.bos_token_id
            if self.prepend_bos and not self.chat_template and bos is not None and (not ids or ids[0] != bos):
                ids = [int(bos)] + ids
            if not ids:
                raise TiltlmError("empty context and the tokenizer has no BOS token; give a non-empty context")
            window = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", None)
            if window is not None and len(ids) + self.max_new_tokens > window:
                raise TiltlmError(
                    f"context of {len(ids)} tokens + max_new_tokens {self.max_new_tokens} exceeds the model's window of {window}; shorten the context or lower max_new_tokens"
                )
            self._context_cache[context] = ids
        return self._context_cache[context]

    def contexts_tensor(self, contexts: list[str], group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded context ids and attention for each row, (B, C)."""
        encoded = [self.encode_context(c) for c in contexts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(contexts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(contexts), width), dtype=torch.bool)
        for k, e in enumerate(encoded):
            ids[k, width - len(e) :] = torch.tensor(e, dtype=torch.long)
            attn[k, width - len(e) :] = True
        return ids[group], attn[group]

    # ---- the protocol ---------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, contexts: list[str], n: int, *, seed: int | None = None, rows: range | None = None) -> Samples:
        """n sequences per context, batched, with KV cache; rows are grouped context by context.

        ``rows`` draws only those rows of the batch, each exactly as in the whole batch (a
        data-parallel rank's shard; tiltlm.distributed).
        """
        if not contexts:
            raise TiltlmError("no contexts to sample from; pass at least one context ('' means just BOS)")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else torch.seed())
        group, rows = batch_rows(len(contexts), n, rows)
        context_ids, context_attn = self.contexts_tensor(contexts, group)
        draw = row_draw(gen, len(contexts) * n, rows, self.sampler)
        ids, token_logp, mask = self._decode(context_ids, context_attn, self.max_new_tokens, draw, same_as=group)
        eos = (ids == self.eos_id) & mask
        return Samples(
            contexts=list(contexts), group=group, context_ids=context_ids, context_attn=context_attn,
            ids=ids, attn=mask.clone(), mask=mask, token_logp=token_logp,
            texts=self.texts_of(ids, mask), eos=eos.any(-1),
        )

    @torch.no_grad()
    def generate(self, prefixes: list[list[int]], *, max_new_tokens: int, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Continue each token prefix (prompt + history) by up to ``max_new_tokens`` tokens, until EOS.

        Row k draws from its own generator seeded ``seeds[k]`` (inverse CDF), so a row's sample does
        not depend on which other rows share the batch. Returns (ids, token_logp, mask), each (b, w).
        No prefixes: nothing to draw, (0, 0) tensors — in lockstep after decoding a throwaway row, so that
        this rank joins the forward passes of the ranks that still have rows.
        """
        if not prefixes:
            if self.lockstep is not None:
                self._decode(*self._left_pad([[self.pad_id]]), int(max_new_tokens), seeded_draw([0]))
            empty = torch.zeros((0, 0))
            return empty.long(), empty, empty.bool()
        ids, attn = self._left_pad(prefixes)
        return self._decode(ids, attn, int(max_new_tokens), seeded_draw(seeds))

    def session(self) -> "DecodeSession":
        """A multi-turn generator that keeps each row's KV cache between calls (see DecodeSession)."""
        return DecodeSession(self)

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.bool)
        for k, r in enumerate(rows):
            if r:
                ids[k, width - len(r):] = torch.tensor(r, dtype=torch.long)
                attn[k, width - len(r):] = True
        return ids, attn

    def _prefill(self, context_ids: torch.Tensor, attn: torch.Tensor, position: torch.Tensor, same_as: torch.Tensor | None):
        """The contexts' forward pass: (KV cache, last logits (B, V)). ``same_as`` (B,): rows with equal
        values have equal contexts (``sample``'s ``group``, rows in runs): each distinct context is encoded
        once and its cache rows repeated, so n samples of a prompt cost one prompt forward, not n."""
        device = self.device
        if same_as is not None and len(same_as) > 1:
            first = torch.ones(len(same_as), dtype=torch.bool)
            first[1:] = same_as[1:] != same_as[:-1]
            if int(first.sum()) < len(same_as):
                rep = first.nonzero().squeeze(-1)  # (U,) the first row of each run
                expand = (first.long().cumsum(0) - 1).to(device)  # (B,) each row's run
                out = self._forward(input_ids=context_ids[rep].to(device), attention_mask=attn[rep.to(device)],
                                    position_ids=position[rep.to(device)], use_cache=True, **self._last_only)
                cache = _cache_of(out)
                if hasattr(cache, "reorder_cache"):  # a transformers Cache (otherwise: encode every row below)
                    cache.reorder_cache(expand)  # index_select of every layer's keys and values: (U, ...) -> (B, ...)
                    return cache, out.logits[:, -1][expand]
        out = self._forward(input_ids=context_ids.to(device), attention_mask=attn, position_ids=position, use_cache=True, **self._last_only)
        return _cache_of(out), out.logits[:, -1]

    def _decode(self, context_ids: torch.Tensor, context_attn: torch.Tensor, max_new_tokens: int, draw, *, past=None, keep_state: bool = False,
                same_as: torch.Tensor | None = None):
        """The KV-cache sampling loop shared by ``sample`` and ``generate``: (ids, token_logp, mask) on CPU.

        With ``past`` (a KV cache of earlier tokens) ``context_ids`` (B, K) are only the new tokens and
        ``context_attn`` covers past and new positions (B, P + K). ``keep_state`` also returns
        (cache, attention over its positions, number of sampled tokens fed into it). ``same_as``: which
        rows share their context (see _prefill; without ``past`` only).
        """
        device = self.device
        b, k = context_ids.shape
        attn = context_attn.to(device).long()  # (B, P + C + t)
        position = (attn.cumsum(-1) - 1).clamp(min=0)[:, -k:]  # real tokens before each one: holes do not count
        if past is None:
            past, logits = self._prefill(context_ids, attn, position, same_as)  # (B, V)
        else:
            out = self._forward(input_ids=context_ids.to(device), attention_mask=attn, position_ids=position, use_cache=True,
                                **{self._cache_kwarg: past}, **self._last_only)
            past, logits = _cache_of(out), out.logits[:, -1]  # (B, V)
        next_position = position[:, -1] + 1  # (B,)
        fed = 0
        reserve(past, max_new_tokens)  # keys and values written in place, not concatenated (tiltlm.policies.kvcache)
        start = attn.shape[1]
        attn_buffer = torch.zeros((b, start + max_new_tokens), dtype=attn.dtype, device=device)  # filled column by column
        attn_buffer[:, :start] = attn

        ids = torch.full((b, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        token_logp = torch.zeros((b, max_new_tokens), device=device)
        mask = torch.zeros((b, max_new_tokens), dtype=torch.bool, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            logp = transform_logits(logits, self.temperature, self.top_p)  # (B, V)
            token = draw(logp)  # (B,)
            alive = ~done
            ids[:, t] = torch.where(alive, token, self.pad_id)
            token_logp[:, t] = torch.where(alive, logp.gather(-1, token[:, None]).squeeze(-1), 0.0)
            mask[:, t] = alive
            done = done | (token == self.eos_id)
            if self.all_ranks(bool(done.all())) or t == max_new_tokens - 1:
                break
            # a finished row's padding is fed (the batch moves together) but masked, so its cache stays clean
            attn_buffer[:, start + t] = alive
            attn = attn_buffer[:, : start + t + 1]
            out = self._forward(
                input_ids=ids[:, t : t + 1], attention_mask=attn, position_ids=next_position[:, None],
                use_cache=True, **{self._cache_kwarg: past},
            )
            past, logits = _cache_of(out), out.logits[:, -1]
            next_position = next_position + 1
            fed += 1

        width = int(mask.sum(-1).max())
        result = ids[:, :width].cpu(), token_logp[:, :width].cpu(), mask[:, :width].cpu()
        return (*result, (past, attn, fed)) if keep_state else result

    def decode_in_lockstep(self, lockstep) -> None:
        """Run every forward pass together with other processes (sharded weights): ``lockstep`` (a
        tiltlm.distributed.dist.Lockstep) tells whether a flag holds on every rank and the largest count."""
        self.lockstep = lockstep

    def all_ranks(self, flag: bool) -> bool:
        """``flag`` on every process decoding in lockstep with this one (just ``flag`` when alone)."""
        return flag if self.lockstep is None else self.lockstep.all(flag)

    def any_rank(self, flag: bool) -> bool:
        """``flag`` on some process decoding in lockstep with this one (just ``flag`` when alone): a rollout
        plays turns while any rank has episodes left, since each turn's forwards are collectives."""
        return not self.all_ranks(not flag)

    def _chunks(self, n: int) -> list[slice]:
        """Row slices of at most ``chunk_size`` (in lockstep: as many slices as the rank with the most rows
        needs; ranks' shards differ by at most one row, so none is empty)."""
        count = -(-n // self.chunk_size)
        count = count if self.lockstep is None else self.lockstep.max(count)
        bounds = [n * k // count for k in range(count + 1)] if count else [0]
        return [slice(a, b) for a, b in zip(bounds, bounds[1:])]

    def encode_text(self, text: str) -> list[int]:
        """Tokens of an environment observation (no special tokens)."""
        try:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        except Exception as e:  # noqa: BLE001 - e.g. a letters-only testbed tokenizer (no [UNK]) meets English text
            why = " ".join(str(e).split())[:200] or type(e).__name__
            raise TiltlmError(f"the tokenizer cannot encode the text {text[:40]!r} ({why}); use a model whose tokenizer "
                              "covers the environment's text (e.g. 'default' or 'smollm2-135m')") from None

    @property
    def window(self) -> int | None:
        """The model's context window in tokens (None if the config does not say)."""
        c = self.model.config
        return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)

    def log_prob(self, samples: Samples, *, grad: bool = False, per_token: bool = False) -> torch.Tensor:
        """log pi(x | context): (B,), or (B, T) per token with zeros off the policy mask.

        One forward pass per row chunk; its final hidden states at the policy's positions only are mapped to
        logits, in blocks (``_token_logp``), so no (B, T, V) tensor exists, with grad or without.

        Without grad (and ``share_contexts``, not in lockstep), a chunk whose rows share contexts (n samples
        of a prompt) encodes each distinct context once and scores the completions on its cached keys and
        values (``_shared_context_logp``): within 1e-5 nats of the whole-sequence pass, not bit for bit (the
        attention and matrix kernels see other shapes, so float32 sums round differently;
        tests/test_shared_context.py). With grad, or where no two rows of a chunk share a context, every
        row's whole sequence is encoded, as before.
        """
        device = self.device
        checkpointed = grad and self.checkpoint_layers and not self.disable_adapters  # (a LoRA prior never trains)
        share = not grad and self.share_contexts and self.lockstep is None  # in lockstep every rank must run the same passes
        with torch.set_grad_enabled(grad), self._checkpointed_layers() if checkpointed else contextlib.nullcontext():
            rows = []
            for sl in self._chunks(len(samples)):
                part = self._shared_context_logp(samples, sl) if share else None
                rows.append(part if part is not None else self._sequence_logp(samples, sl))
            token_logp = torch.cat(rows) if rows else torch.zeros(0, samples.ids.shape[1], device=device)
        return token_logp if per_token else token_logp.sum(-1)

    def _sequence_logp(self, samples: Samples, sl: slice) -> torch.Tensor:
        """log pi of each policy token of rows ``sl``, (b, T): one forward pass of context + completion per row."""
        device = self.device
        c = samples.context_ids.shape[1]
        ids = torch.cat([samples.context_ids[sl], samples.ids[sl]], dim=1).to(device)  # (b, C+T)
        attn = torch.cat([samples.context_attn[sl], samples.attn[sl]], dim=1).to(device).long()
        position = (attn.cumsum(-1) - 1).clamp(min=0)
        mask, tokens = samples.mask[sl].to(device), samples.ids[sl].to(device)  # (b, T)
        head = self.model.get_output_embeddings().forward

        def score(hidden):  # (b, C+T, d) -> (b, T)
            # position C-1+t predicts generated token t; only the policy's positions are scored
            tok = self._token_logp(head, hidden[:, c - 1 : -1][mask], tokens[mask])  # (n,)
            return torch.zeros(mask.shape, dtype=tok.dtype, device=device).masked_scatter(mask, tok)

        return self._scored_forward(score, input_ids=ids, attention_mask=attn, position_ids=position, use_cache=False)

    def _shared_context_logp(self, samples: Samples, sl: slice) -> torch.Tensor | None:
        """``_sequence_logp`` of rows ``sl`` with each distinct context encoded once, as sampling does (_decode):
        (b, T), or None where no two rows share a context or the model's cache cannot be expanded to rows.

        The U distinct contexts (same tokens on the same padding) are prefilled, (U, C); the last context
        position's logits give token 0 (gathered per row from its context's (U, V) log-probs). Rows are then
        taken in groups of similar length (``_length_groups``): a group's cache is its contexts' keys and values
        expanded to its rows, and its tokens 1..w-1 are fed on it at once, their hidden states scoring tokens
        2..w (w: the group's longest row, up to its last policy token), so a row that ended early costs no
        positions beyond its group's width. Positions and attention are those of the whole sequence (context
        padding and completion padding are masked holes), so only float rounding differs from ``_sequence_logp``.
        """
        device = self.device
        context_ids, context_attn = samples.context_ids[sl], samples.context_attn[sl].bool()
        b, c = context_ids.shape
        if b < 2 or c == 0:
            return None
        distinct, inverse = torch.unique(context_ids.masked_fill(~context_attn, -1), dim=0, return_inverse=True)
        if distinct.shape[0] == b:
            return None
        rep = torch.zeros(distinct.shape[0], dtype=torch.long).scatter_reduce_(0, inverse, torch.arange(b), "amin", include_self=False)
        attn = torch.cat([context_attn, samples.attn[sl].bool()], dim=1).to(device).long()  # (b, C+T)
        position = (attn.cumsum(-1) - 1).clamp(min=0)
        prefill_ids, rep, inverse = context_ids[rep].to(device), rep.to(device), inverse.to(device)
        out = self._forward(input_ids=prefill_ids, attention_mask=attn[rep, :c], position_ids=position[rep, :c], use_cache=True,
                            **self._last_only)
        cache = _cache_of(out)
        if not hasattr(cache, "reorder_cache"):  # not a transformers Cache: encode whole sequences instead
            return None
        mask, tokens = samples.mask[sl].to(device), samples.ids[sl].to(device)  # (b, T)
        first = transform_logits(out.logits[:, -1], self.temperature, self.top_p)  # (U, V): token 0's distribution
        token_logp = torch.zeros(mask.shape, dtype=first.dtype, device=device)
        token_logp[:, 0] = torch.where(mask[:, 0], first[inverse, tokens[:, 0]], 0.0)
        head = self.model.get_output_embeddings().forward
        groups = self._length_groups(mask)
        for k, (rows, w) in enumerate(groups):
            rows = rows.to(device)
            group_cache = cache if k == len(groups) - 1 else copy.deepcopy(cache)
            group_cache.reorder_cache(inverse[rows])  # (U, ...) -> (rows, ...): each row's context keys and values
            later = mask[rows, 1:w]  # (r, w-1): the policy tokens 1..w-1 that positions C..C+w-2 predict

            def score(hidden, later=later, targets=tokens[rows, 1:w]):  # (r, w-1, d) -> (r, w-1)
                tok = self._token_logp(head, hidden[later], targets[later])  # (n,)
                return torch.zeros(later.shape, dtype=tok.dtype, device=device).masked_scatter(later, tok)

            token_logp[rows, 1:w] = self._scored_forward(score, input_ids=tokens[rows, : w - 1], attention_mask=attn[rows, : c + w - 1],
                                                         position_ids=position[rows, c : c + w - 1], use_cache=True,
                                                         **{self._cache_kwarg: group_cache})
        return token_logp

    @staticmethod
    def _length_groups(mask: torch.Tensor, keep: float = 0.75) -> list[tuple[torch.Tensor, int]]:
        """Rows to score together after token 0: [(row indices, width w)], longest first, each row once, rows
        whose only policy token is token 0 in none. A row's width is its last policy token's index + 1 (what
        follows it needs no position); a group holds the rows of width in [keep·w, w], so padding is at most
        1 - keep of a group's fed positions while there are at most log(T)/log(1/keep) + 1 groups (forward passes)."""
        t = mask.shape[1]
        width = (mask.cpu().long() * torch.arange(1, t + 1)).amax(-1) if t else torch.zeros(mask.shape[0], dtype=torch.long)
        groups, w = [], int(width.max()) if len(width) else 0
        while w >= 2:
            low = max(2, int(math.ceil(keep * w)))
            rows = ((width >= low) & (width <= w)).nonzero().squeeze(-1)
            if len(rows):
                groups.append((rows, int(width[rows].max())))
            w = low - 1
        return groups

    @torch.no_grad()
    def next_token_logprobs(self, context: str, prefixes: torch.Tensor) -> torch.Tensor:
        """(N, d) generated prefixes -> (N, V) log-probs of the next token (sampling transform applied)."""
        ctx = torch.tensor(self.encode_context(context), dtype=torch.long)
        out = []
        for start in range(0, prefixes.shape[0], self.chunk_size):
            chunk = prefixes[start : start + self.chunk_size]
            ids = torch.cat([ctx.expand(chunk.shape[0], -1), chunk], dim=1).to(self.device)
            logits = self._forward(input_ids=ids, attention_mask=torch.ones_like(ids), **self._last_only).logits[:, -1]
            out.append(transform_logits(logits, self.temperature, self.top_p).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.vocab_size)

    @torch.no_grad()
    def prefix_tree_logprobs(self, context: str, length: int, free: torch.Tensor, *, chunk_rows: int = 32768):
        """An iterator over d = 0..length-1 of the (n^d, V) next-token log-probs of every depth-d prefix
        of ``free`` tokens (n of them) after ``context``, prefixes in lexicographic order; None when this
        model's KV cache is not a plain per-layer (keys, values) cache (then re-encode each prefix).

        The exact enumerator's walk with prefix sharing: depth d feeds one token per prefix on top of
        its parent's KV cache (repeated for its n children) instead of re-encoding all d + C tokens, so
        the whole walk costs about one token-forward per prefix. Same numbers as
        ``next_token_logprobs`` up to float rounding.
        """
        from transformers.cache_utils import DynamicCache, DynamicLayer

        device = self.device
        ctx = torch.tensor(self.encode_context(context), dtype=torch.long, device=device)[None]  # (1, C)
        c = ctx.shape[1]
        out = self._forward(input_ids=ctx, attention_mask=torch.ones_like(ctx), use_cache=True, **self._last_only)
        cache = _cache_of(out)
        if type(cache) is not DynamicCache or not all(type(layer) is DynamicLayer for layer in cache.layers):
            return None
        first = transform_logits(out.logits[:, -1], self.temperature, self.top_p).cpu()  # (1, V)
        kv = [(layer.keys, layer.values) for layer in cache.layers]  # each (1, heads, C, d_head)
        return self._prefix_levels(first, kv, c, length, free.to(device), chunk_rows, DynamicCache)

    @torch.no_grad()  # on a generator function torch switches grad off around each resume only
    def _prefix_levels(self, first, kv, c, length, free, chunk_rows, cache_class):
        yield first
        n, device = free.shape[0], self.device
        for d in range(1, length):
            m = kv[0][0].shape[0]  # parents: the depth d-1 prefixes
            per = max(1, chunk_rows // n)  # parents per chunk
            level, children = [], [([], []) for _ in kv]
            for a in range(0, m, per):
                b = min(m, a + per)
                idx = torch.arange(a, b, device=device).repeat_interleave(n)  # each parent once per child, in order
                cache = cache_class(ddp_cache_data=[(k[idx], v[idx]) for k, v in kv])
                tokens = free.repeat(b - a)[:, None]  # (rows, 1): the children's last tokens
                out = self._forward(
                    input_ids=tokens, attention_mask=torch.ones((tokens.shape[0], c + d), dtype=torch.long, device=device),
                    position_ids=torch.full_like(tokens, c + d - 1), use_cache=True, **{self._cache_kwarg: cache},
                )
                level.append(transform_logits(out.logits[:, -1], self.temperature, self.top_p).cpu())
                if d < length - 1:  # the last level's cache has no children to serve
                    for (ks, vs), layer in zip(children, _cache_of(out).layers):
                        ks.append(layer.keys)
                        vs.append(layer.values)
            if d < length - 1:
                kv = [(torch.cat(ks), torch.cat(vs)) for ks, vs in children]
            yield torch.cat(level)

    def decode(self, ids: list[list[int]]) -> list[str]:
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None and _plain_fast_decode(self.tokenizer):
            # what batch_decode does for a fast tokenizer without clean-up, minus its per-id Python conversion
            try:
                return backend.decode_batch(ids, skip_special_tokens=False)  # lists or tuples of ints
            except TypeError:  # e.g. rows of tensors or numpy integers
                return backend.decode_batch([[int(t) for t in row] for row in ids], skip_special_tokens=False)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def texts_of(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        rows = []
        for row, m in zip(ids.tolist(), mask.tolist()):
            row = [t for t, keep in zip(row, m) if keep]
            if row and row[-1] == self.eos_id:
                row = row[:-1]
            rows.append(row)
        return self.decode(rows)


class DecodeSession:
    """``generate`` across the turns of multi-turn rollouts, keeping each row's KV cache between calls.

    Rows are named by ``keys`` (an episode index). A call encodes only what was appended to a row's
    prefix since its previous call (the new observation, and the action's last token, which sampling
    never feeds), on top of the cached keys/values, instead of re-encoding prompt + whole history:
    a turn costs O(new tokens) instead of O(history). Positions and attention are those of the full
    prefix (padding and finished rows' filler are masked holes), so the log-probs and draws are
    those of ``HFPolicy.generate`` up to float rounding. A row whose prefix does not extend what was
    cached, or a new key, makes the call re-encode every row from scratch.
    """

    def __init__(self, policy: HFPolicy):
        self.policy = policy
        self.past = None  # the KV cache, one row per key of the previous call
        self.attn = None  # (rows, width) long: 1 on cached real tokens, 0 on holes
        self.index: dict = {}  # key -> row of the cache
        self.cached: dict = {}  # key -> the token ids the cache holds for it

    @torch.no_grad()
    def generate(self, keys: list, prefixes: list[list[int]], *, max_new_tokens: int, seeds: list[int]):
        p = self.policy
        if not keys:  # no rows this turn (the cache is kept for the next call)
            return p.generate([], max_new_tokens=max_new_tokens, seeds=[])
        reuse = self.past is not None and all(
            k in self.index and len(prefix) >= len(self.cached[k]) and prefix[: len(self.cached[k])] == self.cached[k]
            for k, prefix in zip(keys, prefixes)
        )
        if reuse:
            rows = torch.tensor([self.index[k] for k in keys], dtype=torch.long)
            past = self.past
            past.reorder_cache(rows.to(p.device))  # keep (and order) the rows still playing
            past_attn = self.attn[rows.to(self.attn.device)].clone()
            news = []
            for r, (k, prefix) in enumerate(zip(keys, prefixes)):
                new = prefix[len(self.cached[k]):]
                if not new:  # nothing appended: forget the last cached token and feed it again for its logits
                    last = int(past_attn[r].nonzero().max())
                    past_attn[r, last] = 0
                    new = prefix[-1:]
                news.append(new)
            ids, attn = p._left_pad(news)
            attn = torch.cat([past_attn.cpu().bool(), attn], dim=1)
        else:
            past = None
            ids, attn = p._left_pad(prefixes)
        out_ids, token_logp, mask, (self.past, self.attn, fed) = p._decode(
            ids, attn, int(max_new_tokens), seeded_draw(seeds), past=past, keep_state=True)
        self.index = {k: r for r, k in enumerate(keys)}
        lengths = mask.sum(-1).tolist()
        self.cached = {k: list(prefix) + out_ids[r, : min(int(lengths[r]), fed)].tolist()
                       for r, (k, prefix) in enumerate(zip(keys, prefixes))}
        return out_ids, token_logp, mask
