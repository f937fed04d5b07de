"""In-process bringup: every node of the stack in one executor, configured from config/*.yaml.

This is the same set of nodes, with the same YAML parameter files, that
``launch/sim.launch.py`` starts as separate processes on a ROS 2 install; here it
runs where ``ros2 launch`` is absent. Each node reads its own section of the
parameter files exactly as under launch (``--ros-args --params-file``).
Lifecycle nodes are configured and activated in order (as Nav2's lifecycle
manager does) when ``autostart`` is set.

    igt-bringup --backend mujoco --duration 5
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Dict, List, Optional

import rclpy

from igt_robot import fastdds_shm, paths
from igt_robot.process_exit import arm_exit_deadline
from igt_robot.nodes.spinning import (BackgroundSpinner, destroy_node_and_actions, settle_for_spinning,
                                      shutdown_executor)

# Set by a parent that starts this process as its child (igt_robot.demo): the read end of a pipe only the
# parent writes to. End-of-file = the parent is gone: shut down (the robot stops), never run as an orphan.
PARENT_PIPE_ENV = 'IGT_PARENT_PIPE_FD'

# name -> (module:class, parameter file). Order is start order.
NODES: Dict[str, tuple] = {
    'hardware_node': ('igt_robot.nodes.hardware_node:HardwareNode', 'robot.yaml'),
    'scanner_interface': ('igt_robot.nodes.scanner_interface_node:ScannerInterfaceNode', 'safety.yaml'),
    'safety_supervisor': ('igt_robot.nodes.safety_supervisor_node:SafetySupervisorNode', 'safety.yaml'),
    'motion_controller': ('igt_robot.nodes.motion_controller_node:MotionControllerNode', 'motion.yaml'),
    'registration_node': ('igt_robot.nodes.registration_node:RegistrationNode', 'registration.yaml'),
    'planner_node': ('igt_planner.planner_node:PlannerNode', 'planner.yaml'),
    # /robot_description, /tf, /tf_static (robot links too: no robot_state_publisher without ROS installed).
    'state_publisher': ('igt_robot.nodes.state_publisher_node:StatePublisherNode', 'robot.yaml'),
    'igtl_bridge': ('igt_robot.nodes.igtl_bridge_node:IgtlBridgeNode', 'procedure.yaml'),
    'recorder_node': ('igt_robot.nodes.recorder_node:RecorderNode', 'procedure.yaml'),
    'procedure_node': ('igt_robot.nodes.procedure_node:ProcedureNode', 'procedure.yaml'),
    # Only with a motor controller that has a trigger port (docs/serial_protocol.md §9), in a process of its own.
    'scanner_trigger': ('igt_robot.nodes.scanner_trigger_node:ScannerTriggerNode', 'robot.yaml'),
}
# Nodes a profile names explicitly, never part of the all-in-one profiles.
OWN_PROCESS_NODES = ['scanner_trigger']
CONTROL_NODES = ['hardware_node', 'scanner_interface', 'safety_supervisor', 'motion_controller']
PROFILES = {
    'sim': [name for name in NODES if name not in OWN_PROCESS_NODES],
    'robot': [name for name in NODES if name not in OWN_PROCESS_NODES],
    'safety': list(CONTROL_NODES),
    # The split `make demo` uses: the hardware node and the trajectory streaming in a lean process (the
    # scanner callback commands the drive, nothing else time-critical shares its GIL), the scanner
    # interface and the supervisor in a second, image processing and the workflow in a third
    # (docs/safety.md).
    'control': ['hardware_node', 'motion_controller'],
    'supervision': ['scanner_interface', 'safety_supervisor'],
    'workflow': [name for name in NODES if name not in CONTROL_NODES + OWN_PROCESS_NODES],
    # The scanner -> trigger-port relay alone: the lean process of docs/safety.md.
    'trigger': ['scanner_trigger'],
}


def load_class(target: str):
    module, cls = target.split(':')
    return getattr(importlib.import_module(module), cls)


def available_nodes(names: List[str]) -> List[str]:
    """The subset of ``names`` whose modules exist in this install (all of them in a complete one)."""
    found = []
    for name in names:
        module = NODES[name][0].split(':')[0]
        if importlib.util.find_spec(module) is not None:
            found.append(name)
    return found


class Bringup:
    """Creates the nodes in one context and spins them in one multi-threaded executor."""

    def __init__(self, names: List[str], config_dir: Optional[pathlib.Path] = None,
                 overrides: Optional[Dict[str, Dict[str, object]]] = None, context=None,
                 extra_params_files: Optional[List[pathlib.Path]] = None, threads: int = 6,
                 executor: str = 'multi'):
        self.config_dir = pathlib.Path(config_dir) if config_dir else paths.data_dir('config')
        self.context = context or rclpy.Context()
        if not self.context.ok():
            rclpy.init(context=self.context)
        from igt_robot.nodes.common import make_executor
        self.executor = make_executor(executor, threads, context=self.context)
        self.nodes = {}
        overrides = overrides or {}
        for name in names:
            target, params_file = NODES[name]
            args = ['--ros-args', '--params-file', str(self.config_dir / params_file)]
            for extra in extra_params_files or []:
                args += ['--params-file', str(extra)]
            for key, value in overrides.get(name, {}).items():
                args += ['-p', f'{key}:={_param_text(value)}']
            node = load_class(target)(context=self.context, cli_args=args)
            self.nodes[name] = node
            self.executor.add_node(node)
        self._spinner = None

    def adopt(self, node):
        """Spin ``node`` (made in this bringup's context, e.g. a test's probe) with the stack, and destroy it with
        the stack, in the same order (a node left behind keeps the context's DDS participant alive)."""
        self.executor.add_node(node)      # no-op when it is there already
        self.nodes[node.get_name()] = node
        return node

    def start(self):
        self._spinner = BackgroundSpinner(self.executor, name='bringup-executor')
        for node in self.nodes.values():
            autostart = getattr(node, 'autostart_lifecycle', None)
            if callable(autostart):
                autostart()
        return self

    def shutdown(self):
        for node in reversed(list(self.nodes.values())):
            with contextlib.suppress(Exception):
                shutdown_hook = getattr(node, 'on_bringup_shutdown', None)
                if callable(shutdown_hook):
                    shutdown_hook()
        # Callbacks finish before the nodes are destroyed (igt_robot.nodes.spinning says why).
        if self._spinner is not None:
            self._spinner.stop(timeout_sec=3.0)
        else:
            shutdown_executor(self.executor, timeout_sec=3.0)
        for node in reversed(list(self.nodes.values())):
            destroy_node_and_actions(node)
        with contextlib.suppress(Exception):
            rclpy.shutdown(context=self.context)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()


def _param_text(value) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (list, tuple)):
        return '[' + ','.join(_param_text(v) for v in value) + ']'
    return str(value)


def _watch_parent(stop: threading.Event) -> None:
    """Set ``stop`` when the parent that started this process dies (pipe end-of-file, or re-parenting)."""
    fd_text = os.environ.pop(PARENT_PIPE_ENV, '')
    parent = os.getppid()
    if parent == 1:   # the parent died before this process got here (PR_SET_PDEATHSIG cannot fire any more)
        stop.set()
        return
    if not fd_text:
        return

    def watch():
        with contextlib.suppress(OSError):
            while os.read(int(fd_text), 1):
                pass
        print('[bringup] parent process gone: shutting down', flush=True)
        stop.set()
    threading.Thread(target=watch, name='parent-watch', daemon=True).start()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description='Run the igt_robot stack in one process.')
    parser.add_argument('--profile', choices=sorted(PROFILES), default='sim')
    parser.add_argument('--backend', choices=['mujoco', 'serial'], default=None,
                        help='hardware backend (default: the one in config/robot.yaml)')
    parser.add_argument('--config-dir', type=pathlib.Path, default=None)
    parser.add_argument('--executor', choices=['multi', 'events'], default='multi',
                        help="rclpy executor: 'events' = rclpy.experimental.EventsExecutor (one thread; only for "
                             'nodes whose callbacks never block)')
    parser.add_argument('--duration', type=float, default=0.0, help='seconds to run (0 = until Ctrl-C)')
    parser.add_argument('--set', action='append', default=[], metavar='NODE.PARAM=VALUE',
                        help='override one parameter of one node (repeatable)')
    args = parser.parse_args(argv)
    names = available_nodes(PROFILES[args.profile])
    overrides = {'hardware_node': {'backend': args.backend}} if args.backend else {}
    for item in args.set:
        target, _, value = item.partition('=')
        node, _, param = target.partition('.')
        if not (node and param and _):
            parser.error(f'--set {item!r}: expected NODE.PARAM=VALUE')
        overrides.setdefault(node, {})[param] = value
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _watch_parent(stop)
    removed = fastdds_shm.remove_dead_fastdds_shm()
    if removed:
        print(f'[bringup] removed {len(removed)} Fast DDS shared-memory file(s) of dead processes', flush=True)
    bringup = Bringup(names, args.config_dir, overrides, executor=args.executor)
    settle_for_spinning()
    with bringup:
        print(f'[bringup] running {len(names)} node(s): {", ".join(names)}', flush=True)
        deadline = time.monotonic() + args.duration if args.duration > 0 else None
        try:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                stop.wait(0.2)
        except KeyboardInterrupt:
            pass
        arm_exit_deadline()     # from here on, never an orphan: bounded even if a callback hangs
        for name, node in bringup.nodes.items():
            describe = getattr(node, 'describe_state', None)
            print(f'[bringup] {name}: {describe() if callable(describe) else "running"}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
