"""Shared fixtures: a trained small-vocabulary testbed model (created once per session)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def testbed_dir(tmp_path_factory):
    from tiltlm.testbed import make_testbed

    return make_testbed(tmp_path_factory.mktemp("testbed"), vocab_size=5, n_layer=2, n_embd=32, seed=0, train_steps=60)


@pytest.fixture(scope="session")
def testbed_policy(testbed_dir):
    from tiltlm.policies import HFPolicy

    return HFPolicy.from_pretrained(testbed_dir, max_new_tokens=4)
