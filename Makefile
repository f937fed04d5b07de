# igt_robot — the two commands: `make demo` (the simulated procedure) and `make test` (the test suite).
# Both set the environment up first if needed (`make setup`, idempotent).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Isolated ROS graph for every run: loopback only, a per-run domain id that no other process on this
# machine uses (igt_robot.ros_domain checks the bound ports), logs inside the build tree.
ROS_ENV = ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID=$${ROS_DOMAIN_ID:-$$($(PY) -m igt_robot.ros_domain)} \
          ROS_LOG_DIR=$(CURDIR)/build/ros_log MUJOCO_GL=$${MUJOCO_GL:-egl} PYTHONUNBUFFERED=1

.PHONY: setup demo test bench colcon-check clean

setup:
	@bash tools/setup.sh

demo: setup
	@$(ROS_ENV) $(PY) -m igt_robot.demo $(DEMO_ARGS)

# A test that hangs (e.g. in a DDS library deadlock) ends the run after 15 minutes with every thread's stack,
# instead of holding CI to its limit; the longest test takes about two minutes.
test: setup
	@$(ROS_ENV) $(PY) -m pytest src/igt_robot/test src/igt_planner/test --timeout=900 --timeout-method=thread \
		$(PYTEST_ARGS)

bench: setup
	@rc=0; for b in bench/*.py; do echo "== $$b"; $(ROS_ENV) $(PY) $$b || rc=1; done; exit $$rc

# Check that colcon (from PyPI) finds and builds every ROS package of the repository.
colcon-check: setup
	@bash tools/colcon_check.sh

clean:
	rm -rf build
