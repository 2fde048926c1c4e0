"""Peak memory of a training's start: the default recipe's dataset built from the cache (the simulated
episodes, optionally mirrored, and the four shared recordings) and the heads' target normalisation
fitted over it, `--chunk` samples at a time (0: all at once, as before 2026-12-03). Run it once per
setting: the peak is the process's.

    python benchmarks/train_memory.py --mirror --chunk 0
    python benchmarks/train_memory.py --mirror --chunk 1024
"""

import argparse
import resource
import time
from pathlib import Path

from fusion_attn.config import cache_dir
from fusion_attn.learn.data import build_datasets
from fusion_attn.learn.loop import TrainConfig
from fusion_attn.learn.objectives import build_heads, fit_normalisation

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"
BAGS = ("euroc_v1_01_cam_imu", "husky_imu_odom_gps.bag", "sick_lms1xx_scan_cloud_radar.bag", "lidar_camera_frame")

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--mirror", action="store_true", help="with each simulated episode's mirror image (train --mirror)")
parser.add_argument("--chunk", type=int, default=1024, help="samples per target batch (0: all at once)")
args = parser.parse_args()

tc = TrainConfig(bags=tuple(str(REAL / b) for b in BAGS), mirror=args.mirror)
cfg = tc.fusion_config()
train, _ = build_datasets(tc, cfg, cache_dir("train"), progress=False)
start = time.perf_counter()
fit_normalisation(build_heads(cfg), train.tensors(), cfg, len(train), chunk=args.chunk or len(train))
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
print(f"{len(train)} training samples, mirror {args.mirror}, chunk {args.chunk or 'all'}: normalisation "
      f"{time.perf_counter() - start:.1f} s, peak memory {peak_gb:.1f} GiB")
