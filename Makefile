# fusion_attn set-up and checks. `make run` and `make test` work from a fresh clone: the first run
# creates .venv and installs everything (a few minutes); later runs skip that via a stamp file.
PYTHON ?= python3
VENV   ?= .venv
# The recording to fuse; override with `make run BAG=path/to/your.bag`.
BAG    ?= ../shared/data/real/euroc_v1_01_cam_imu

STAMP     := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run test colcon-check venv clean

# The main job on the embedded default: CPU, ONNX Runtime, no robot, the packaged default model:
# replay a recording as the node would fuse it; fused-state bag, summary and plots in $(OUT).
OUT    ?= replay_out
run: $(STAMP)
	$(VENV)/bin/fusion-attn replay $(BAG) -o $(OUT) --backend onnxruntime

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# Build with colcon (the robot's path) into a temp workspace and check the install tree.
colcon-check: $(STAMP) $(DEV_STAMP)
	tools/colcon_check.sh $(VENV)

venv: $(STAMP)

# CPU torch pin first (requirements-cpu.txt), then the package with the ROS 2 wheels and test tools.
$(STAMP): setup.py setup.cfg pyproject.toml requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	touch $(VENV)/COLCON_IGNORE
	$(VENV)/bin/python -m pip install -r requirements-cpu.txt -e '.[ros-wheels,test,sim,rl]'
	touch $@

$(DEV_STAMP): requirements-dev.txt $(STAMP)
	$(VENV)/bin/python -m pip install -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
