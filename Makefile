# fusion_attn set-up and checks. `make run` and `make test` work from a fresh clone: the first run
# creates .venv and installs everything (a few minutes); later runs skip that via a stamp file.
PYTHON ?= python3
VENV   ?= .venv
# The recording to fuse; override with `make run BAG=path/to/your.bag`.
BAG    ?= ../shared/data/real/euroc_v1_01_cam_imu

STAMP     := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run test colcon-check venv clean default-model robustness

# The main job on the embedded default: CPU, ONNX Runtime, no robot, the packaged default model:
# replay a recording as the node would fuse it; fused-state bag, summary and plots in $(OUT).
OUT    ?= replay_out
run: $(STAMP)
	$(VENV)/bin/fusion-attn replay $(BAG) -o $(OUT) --backend onnxruntime

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The packaged default model (fusion_attn/data/fusion_default*.safetensors), reproduced: simulated
# episodes plus the real recordings beside the checkout; ~15 min on one CPU core (docs/TRAINING.md).
REAL   ?= ../shared/data/real
REAL_BAGS := $(REAL)/euroc_v1_01_cam_imu $(REAL)/husky_imu_odom_gps.bag $(REAL)/sick_lms1xx_scan_cloud_radar.bag \
	$(REAL)/lidar_camera_frame
default-model: $(STAMP)
	$(VENV)/bin/fusion-attn train -o runs/default --bag $(REAL_BAGS)
	mkdir -p fusion_attn/data
	cp runs/default/model.safetensors fusion_attn/data/fusion_default.safetensors
	cp runs/default/model.heads.safetensors fusion_attn/data/fusion_default.heads.safetensors

# docs/RESULTS.md: baselines trained the same way on the same data as runs/default (run
# default-model first), then every single-sensor fault x τ on held-out episodes and the real recordings.
robustness: $(STAMP)
	$(VENV)/bin/fusion-attn train -o runs/concat --fusion concat --fixed-tau --eval-every 3000 --bag $(REAL_BAGS)
	$(VENV)/bin/fusion-attn train -o runs/mean --fusion mean --fixed-tau --eval-every 3000 --bag $(REAL_BAGS)
	$(VENV)/bin/fusion-attn train -o runs/fixed_tau --fixed-tau --eval-every 3000 --bag $(REAL_BAGS)
	$(VENV)/bin/fusion-attn eval-robustness attention=runs/default fixed_tau=runs/fixed_tau concat=runs/concat \
		mean=runs/mean -o docs/results --bag $(REAL)/euroc_v1_01_cam_imu $(REAL)/lidar_camera_frame \
		$(REAL)/sick_lms1xx_scan_cloud_radar.bag

# Build with colcon (the robot's path) into a temp workspace and check the install tree.
colcon-check: $(STAMP) $(DEV_STAMP)
	tools/colcon_check.sh $(VENV)

venv: $(STAMP)

# CPU torch pin first (requirements-cpu.txt), then the package with the ROS 2 wheels and test tools.
$(STAMP): setup.py setup.cfg pyproject.toml requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	touch $(VENV)/COLCON_IGNORE
	$(VENV)/bin/python -m pip install -r requirements-cpu.txt -e '.[ros-wheels,test,sim,train,rl]'
	touch $@

$(DEV_STAMP): requirements-dev.txt $(STAMP)
	$(VENV)/bin/python -m pip install -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
