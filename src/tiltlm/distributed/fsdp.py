"""Fully sharded data parallel (torch FSDP2 ``fully_shard``), for models that do not fit on one device.

A step is split over the ranks exactly as with replicated weights (tiltlm.distributed.dist): each rank
draws, scores and backpropagates its own rows of the one global batch. What changes is where the
weights live: each rank keeps 1/W of every parameter, of its gradient and of its Adam moments, and a
unit (a transformer block, ``distributed.fsdp_units``; the rest of the model is the root unit) gathers its
parameters just before its forward or backward. Consequences the loop honours:

- Every forward is a collective, so every rank runs the same number of them: the decode loop stops
  only when every rank's rows have ended (``HFPolicy.decode_in_lockstep``), an environment rollout plays
  turns until every rank's episodes have ended (a policy in lockstep asked for no rows decodes a throwaway one),
  ``log_prob`` splits every rank's rows into the same number of chunks, and exact metrics are computed
  on every rank (rank 0 logs them).
- Gradients are reduce-scattered as sums (divide factor 1, sum-only collectives: gloo has no
  pre-multiplied sum), the full-batch gradient that replicate's all-reduce gives.
- Checkpoints and ``policy/`` hold the full tensors in the one-process format (optimiser state keyed by
  parameter index), so a run resumes with any number of processes and either strategy.

Not supported, each a one-line error: tabular policies (nothing to shard; this includes the tabular
environment's), vLLM generation, and off-policy proposal updates (a sharded model cannot be deep-copied).
"""

from __future__ import annotations

import torch

from tiltlm.distributed.dist import World, rank_device
from tiltlm.errors import TiltlmError


def check_supported(config, policy) -> None:
    """One-line errors for the combinations a sharded run cannot do."""
    replicate = "use distributed.strategy: replicate"
    fix = None
    if not hasattr(policy, "decode_in_lockstep"):
        fix = f"only Hugging Face policies are sharded ({type(policy).__name__} is not one); {replicate}"
    elif config.rollout.generation != "policy":
        fix = f"rollout.generation: vllm needs the whole weights on the generating rank; {replicate} or rollout.generation: policy"
    elif getattr(config.algorithm, "off_policy", False) and getattr(config.algorithm, "proposal_check_every", 0):
        fix = f"off-policy proposal updates copy the policy, and a sharded model cannot be copied; set algorithm.proposal_check_every: 0 or {replicate}"
    if fix:
        raise TiltlmError(f"distributed.strategy fsdp: {fix}")


def _units(model: torch.nn.Module, names: tuple[str, ...] | None) -> list[torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    wanted = set(names) if names else set(getattr(base, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in wanted and m is not model]
    if names and not units:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise TiltlmError(f"distributed.fsdp_units {list(names)} match no module of the model; module classes: {', '.join(present[:12])}…")
    return units


def shard_policies(policy, prior, world: World, *, units: tuple[str, ...] | None = None, reshard_after_forward: bool = True) -> None:
    """Shard the policy's model and the prior's (once when LoRA shares one model) over the group, in place.

    Each unit of ``units`` (default: the model's transformer blocks) and then the whole model become
    FSDP modules; the caller then has the policies run every forward in lockstep with the other ranks
    (tiltlm.distributed.strategy.Fsdp.prepare).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(rank_device().type, (world.size,))
    models = [policy.model] + ([prior.model] if prior.model is not policy.model else [])
    for model in models:
        for unit in _units(model, units):  # collected first: fully_shard changes each unit's class
            fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
        for m in model.modules():
            if isinstance(m, FSDPModule):  # sum, not mean: each rank's backward is its rows' share of the global loss
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor, gathered on every rank (a plain tensor as it is)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def trainable_state(module: torch.nn.Module, world: World) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters on rank 0 ({} elsewhere); every rank must call it."""
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            whole = full(p.detach())
            if world.is_main:
                out[name] = whole.contiguous().cpu()
    return out


def _trainable_names(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]  # the optimiser's parameter order


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict:
    """The optimiser's full state on rank 0 ({} elsewhere) in ``optimizer.state_dict()``'s own format
    (parameters by index), as one process saves it; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return {}
    index = {name: i for i, name in enumerate(_trainable_names(module))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return {"state": {index[n]: slots for n, slots in by_name["state"].items()}, "param_groups": groups}


def load_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor], optim_state: dict) -> None:
    """Load full (one-process format) weights and optimiser state into the sharded module; every rank
    passes the same full state (each read the checkpoint) and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(module, weights, options=options)
    if not optim_state["state"]:  # a stateless optimiser (SGD): only the hyper-parameters, which every rank holds whole
        optimizer.load_state_dict(optim_state)
        return
    names = _trainable_names(module)
    by_name = {"state": {names[int(i)]: slots for i, slots in optim_state["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optim_state["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, by_name, options=options)


def unsharded_policy(policy, world: World):
    """An ordinary (unsharded) HFPolicy with the full weights on rank 0, None elsewhere; every rank must
    call it. It is rebuilt from the model's config, so ``save`` writes what one process would."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    from tiltlm.policies.hf import HFPolicy

    model = policy.model
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = next(iter(weights.values())).dtype
    fresh = AutoModelForCausalLM.from_config(base.config).to(dtype)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model

        fresh = get_peft_model(fresh, model.peft_config[model.active_adapter])
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    tied = {k for k in missing if any(k.endswith(t) for t in ("lm_head.weight", "embed_out.weight"))}
    if unexpected or set(missing) - tied:
        raise TiltlmError(f"cannot rebuild the unsharded model ({len(missing)} missing, {len(unexpected)} unexpected tensors); "
                          "save with distributed.strategy: replicate")
    if tied:
        fresh.tie_weights()
    return HFPolicy(fresh, policy.tokenizer, max_new_tokens=policy.max_new_tokens, temperature=policy.temperature,
                    top_p=policy.top_p, prepend_bos=policy.prepend_bos, chunk_size=policy.chunk_size, logits_chunk=policy.logits_chunk,
                    chat_template=policy.chat_template, sampler=policy.sampler)
