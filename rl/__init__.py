"""Reinforcement learning on the fused state (simulation, agent, policy node)."""

import os

# MuJoCo picks its GL backend when first imported (the FusionAttn envs import it): headless EGL must be
# chosen before that (fusion_attn/sim explains).
os.environ.setdefault("MUJOCO_GL", "egl")
