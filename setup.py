"""Build definition of fusion_attn: an ament_python package, built by colcon on a robot and by pip in a venv.

Set-up pins (torch==2.13.0 CPU on the dev/CI machine) live in requirements-cpu.txt, not here: the library
only needs torch>=2.1, so a Jetson's NVIDIA torch wheel satisfies it.
"""

from glob import glob

from setuptools import find_packages, setup

package_name = "fusion_attn"

# ROS 2 (Kilted) from PyPI wheels, for a venv without a sourced /opt/ros/<distro>.
# Never in install_requires: on a robot the system ROS 2 must be the one in use.
ROS_WHEELS = [
    "ros-rclpy",
    "ros-sensor-msgs",
    "ros-std-msgs",
    "ros-geometry-msgs",
    "ros-nav-msgs",
    "ros-diagnostic-msgs",
    "ros-lifecycle-msgs",
    "ros-rosgraph-msgs",
    "ros-std-srvs",
    "ros-rmw-fastrtps-cpp",
]

setup(
    name=package_name,
    version="0.1.0",  # keep equal to package.xml and fusion_attn.__version__ (tests/test_packaging.py)
    description="Temperature-controlled cross-attention fusion of camera, lidar and IMU for ROS 2.",
    maintainer="fusion_attn maintainers",
    maintainer_email="fusion-attn@example.invalid",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=[package_name, package_name + ".*", "rl", "rl.*"]),
    package_data={package_name: ["backends/*.txt", "data/*", "data/**/*"]},
    zip_safe=False,  # package data is read from the file system at run time
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml")),
    ],
    install_requires=[
        "numpy>=1.24",
        "pyyaml",
        "safetensors",
        "onnx",
        "onnxscript",
        "onnxruntime",
        "rosbags>=0.10",
        "zstandard",  # rosbags: zstd-compressed rosbag2 files and messages
        "lz4",  # rosbags: lz4-compressed ROS 1 bag chunks
        "mcap",  # reading MCAP files cut short (no index), record by record
        "opencv-python-headless",
        "matplotlib",  # replay plots (Agg backend, no display)
        "tqdm",  # replay progress
        "torch>=2.1",
    ],
    extras_require={
        "ros-wheels": ROS_WHEELS,
        "test": ["pytest", "pytest-xdist", "hypothesis", "psutil"],
        # The simulator (fusion_attn/sim), tested with MuJoCo 4.0 (older 3.x releases call mj_multiRay without
        # its `normal` argument); headless rendering needs the system's EGL (Mesa) library.
        "sim": ["mujoco>=4.0", "gymnasium>=1.0"],
        # `fusion-attn train`: TensorBoard logs (simulated training data also needs `sim`)
        "train": ["tensorboard"],
        # attention-memory RL (rl/): the LSTM baseline and the throughput comparison use sb3-contrib's
        # RecurrentPPO
        "rl": ["sb3-contrib>=2.3", "tensorboard"],
        # RL env workers and replay jobs on a Ray cluster (rl/workers.py, fusion_attn/batch.py; docs/SCALE_OUT.md)
        "ray": ["ray>=2.9"],
    },
    entry_points={
        "console_scripts": [
            "fusion-attn = fusion_attn.cli:main",
            "fusion_node = fusion_attn.node:main",
            "sim_bridge = fusion_attn.sim.bridge:main",
            "policy_node = rl.policy_node:main",
        ],
        # extra `fusion-attn` verbs (fusion_attn/cli/__init__.py): fusion_attn itself never imports rl
        "fusion_attn.cli": ["rl = rl.__main__:cli_verb"],
    },
)
