"""fusion_attn: temperature-controlled cross-attention fusion of camera, lidar and IMU for ROS 2."""

__version__ = "0.1.0"
