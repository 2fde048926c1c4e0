"""The ONNX graphs much of the test run needs, and `python tests/graphs.py`, which exports them into
$FUSION_ATTN_CACHE. With `--prefetch-graphs` (as `make test` runs) conftest starts it beside the run, so
that torch.export's single-threaded tracing of these graphs (15-50 s each here) overlaps the tests on
the other core; a test that needs one before it is ready waits for it (pipeline._cached_export's lock)."""

import torch

from fusion_attn.config import FusionConfig, ModelConfig
from fusion_attn.model import FusionModel

# test_export's second graph at the default opset: the model options the plain graph lacks
OPTIONS = {"qk_norm": True, "learned_head_temperature": True, "lidar_motion": True, "lidar_motion_direct": True,
           "imu_direct": True, "stale_evidence": True, "camera_stem": 8, "camera_column_blocks": 1, "rate_readout": True}
STEP_CAMERA = ((48, 64, 3), "rgb8")  # test_step's one-graph export, which test_tensorrt builds engines from


def random_model(seed: int, **options) -> FusionModel:
    """An untrained model of the default configuration with `options`, its weights drawn from `seed`."""
    torch.manual_seed(seed)
    return FusionModel(FusionConfig(model=ModelConfig(**options))).eval()


if __name__ == "__main__":
    from fusion_attn.pipeline import load_model, onnx_for, step_onnx_for

    packaged = load_model(None)[0]
    onnx_for(packaged)  # replay, the nodes, the pipeline and RL tests
    onnx_for(random_model(0))  # test_export's plain graph, test_tensorrt's "a"
    onnx_for(random_model(0, **OPTIONS))
    onnx_for(random_model(0, odometry=True, second_imu=True))  # test_odometry's, test_node_dds' fifth-sensor node
    onnx_for(random_model(0, second_imu=True))  # test_second_imu's
    step_onnx_for(packaged, *STEP_CAMERA)
