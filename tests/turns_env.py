"""An environment whose episodes last 1 turn ("short") or 3 turns ("long"), for tests/test_fsdp.py.

With 2 episodes per task over 2 data-parallel ranks, rank 0 plays only short episodes and rank 1 only
long ones, so under FSDP rank 0 must keep joining rank 1's forward passes for turns 2 and 3.
Named by file in a config (`env: {name: tests/turns_env.py:Turns}`), as a user's own env would be.
"""

from tiltlm.envs.base import Env, StepResult


class Turns(Env):
    name = "turns-test"
    max_turns = 3

    def tasks(self):
        return ["short", "long"]

    def episode(self, seed):
        class Episode:
            def reset(self, task):
                self.left = 1 if task == "short" else 3
                return f"A {task} game. Say something:"

            def step(self, action):
                self.left -= 1
                return StepResult(" Again:", len(action) / 10, self.left == 0, {})

        return Episode()
