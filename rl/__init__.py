"""Reinforcement learning on the fused state (simulation, agent, policy node)."""

import os

# MuJoCo picks its GL backend when first imported, and TorchRL (rl/ppo.py) imports it: headless EGL
# must be chosen before any of that (fusion_attn/sim explains).
os.environ.setdefault("MUJOCO_GL", "egl")
