"""Small memory tasks for the agents, registered when this module is imported (the tests' and
benchmarks/rl_agents.py's envs, and an example of an env module for `rl train`):

    fusion-attn rl train rl.envs:FusionAttnRL/CueRecall-v0 --env-kwargs '{"delay": 12}' --memory 8 -o runs/cue

Only on demand (`MODULE:EnvId` as above, or `--import rl.envs`): `import rl` does not import Gymnasium,
as policy_node runs on a robot without it.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from fusion_attn.errors import ConfigError


class CueRecall(gym.Env):
    """A cue (one of 3) is shown at the first decision only; `delay` decisions later a flag asks for
    it, and the action there must name the cue (reward 1, info["is_success"]); the episode ends. The
    actions in between do nothing. Without memory the best is chance, 1/3; a GTrXL agent reaches the
    cue only if delay <= its memory K (docs/RL.md). info["cue"] is the cue's index at every step (never
    an observation: a target for --aux-info)."""

    observation_space = gym.spaces.Box(0.0, 1.0, (4,), np.float32)  # cue one-hot, "answer now" flag
    action_space = gym.spaces.Discrete(3)

    def __init__(self, delay: int = 7):
        if delay < 1:
            raise ConfigError(f"CueRecall delay {delay}: at least 1 decision between the cue and the answer")
        self.delay = delay

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.cue = 0, int(self.np_random.integers(3))
        return np.eye(4, dtype=np.float32)[self.cue], {"cue": self.cue}

    def step(self, action):
        self.t += 1
        if self.t <= self.delay:
            return np.eye(4, dtype=np.float32)[3] * (self.t == self.delay), 0.0, False, False, {"cue": self.cue}
        success = int(action) == self.cue
        return np.zeros(4, np.float32), float(success), True, False, {"is_success": success, "cue": self.cue}


gym.register("FusionAttnRL/CueRecall-v0", entry_point=CueRecall)
