"""The layers import one way (docs/ARCHITECTURE.md): the core needs neither ROS nor the simulator, nothing in
fusion_attn imports rl, and policy_node runs on a robot without MuJoCo or Gymnasium."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ("frames", "adapters", "sync", "clock", "tokenize", "model", "backends", "pipeline", "outputs", "contract",
        "config", "params", "checkpoint", "errors", "bag", "replay", "learn")


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_nothing_in_fusion_attn_imports_rl():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p) if m == "rl" or m.startswith("rl."))
                 for p in (ROOT / "fusion_attn").rglob("*.py")}
    assert not {p: m for p, m in offenders.items() if m}


def _loaded_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stderr
    return set(run.stdout.split())


def test_policy_node_loads_neither_mujoco_nor_gymnasium():
    loaded = _loaded_after("import rl.policy_node")
    assert "rl" in loaded and "rclpy" in loaded  # it did import
    assert not loaded & {"mujoco", "gymnasium", "torch"}


def test_the_core_imports_neither_ros_nor_the_simulator():
    loaded = _loaded_after("\n".join(f"import fusion_attn.{m}" for m in CORE))
    assert "fusion_attn" in loaded and "torch" in loaded  # it did import (the model needs torch)
    assert not loaded & {"rclpy", "mujoco", "gymnasium", "rl"}
