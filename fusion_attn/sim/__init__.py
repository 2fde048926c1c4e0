"""Gymnasium environments: a MuJoCo ground robot whose sensors emit the core's frames.

Importing this package registers the ids (tasks.py documents each task):

    FusionAttn/Memory-v0, FusionAttn/Navigate-v0, FusionAttn/Control-v0        continuous (v, omega)
    FusionAttn/Memory-Discrete-v0, ...Navigate-Discrete-v0, ...Control-Discrete-v0

Rendering is headless on the CPU through EGL (Mesa) unless MUJOCO_GL says otherwise; MuJoCo reads
it when first imported, so it is set here, before any module of this package imports mujoco.
A GL context does not survive fork(): give AsyncVectorEnv context="spawn" once this process has
rendered (a forked worker then raises instead of hanging).
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

from gymnasium.envs.registration import register

for _name in ("Memory", "Navigate", "Control"):
    register(f"FusionAttn/{_name}-v0", "fusion_attn.sim.robot:RobotEnv", kwargs={"task": _name.lower()})
    register(f"FusionAttn/{_name}-Discrete-v0", "fusion_attn.sim.robot:RobotEnv",
             kwargs={"task": _name.lower(), "discrete": True})
