"""Scaling out: data parallelism (dist.py), Ray rollout and reward workers (ray_rollout.py), vLLM
generation (vllm_backend.py). Ray and vLLM are optional extras, imported only when used."""

from tiltlm.distributed.dist import World, current_world, init_from_env

__all__ = ["World", "current_world", "init_from_env"]

