"""vLLM generation: on a CUDA machine with vllm, samples come from vLLM and the log-probs from the policy.

Without CUDA or vllm the GPU test skips; the guard that names the fix runs everywhere.
"""

import pytest
import torch

from tiltlm.errors import TiltlmError


def _has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_vllm() and torch.cuda.is_available(), reason="vllm and CUDA are here: the guard does not fire")
def test_without_vllm_or_cuda_the_error_names_the_fix():
    from tiltlm.distributed.vllm_backend import VLLMGenerator

    with pytest.raises(TiltlmError, match="vLLM generation needs .*(pip install|sample with the policy itself)"):
        VLLMGenerator(object())  # the guard fires before the policy is looked at


@pytest.mark.skipif(not (_has_vllm() and torch.cuda.is_available()), reason="needs vllm and a CUDA GPU")
def test_vllm_samples_are_scored_by_the_policy_and_follow_its_weights(testbed_dir):
    from tiltlm.distributed.vllm_backend import VLLMGenerator
    from tiltlm.policies import HFPolicy

    policy = HFPolicy.from_pretrained(testbed_dir, max_new_tokens=4)
    policy.model.to("cuda")
    gen = VLLMGenerator(policy, gpu_memory_utilization=0.2)
    s = gen.sample([""], 64, seed=0)
    torch.testing.assert_close(s.token_logp, policy.log_prob(s, per_token=True).cpu())
    assert torch.isfinite(s.token_logp).all() and len(set(s.texts)) > 1
    part = gen.sample([""], 64, seed=0, rows=range(10, 20))
    assert part.texts == s.texts[10:20]  # a row's seed is its own
    with torch.no_grad():  # make EOS the only likely first token: after sync vLLM must follow
        policy.model.get_output_embeddings().weight[policy.eos_id] += 50.0
    gen.sync()
    assert (gen.sample([""], 16, seed=1).lengths == 1).all()
