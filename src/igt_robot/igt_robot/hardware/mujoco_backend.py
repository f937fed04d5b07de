"""MuJoCo physics backend: the needle guide simulated behind :class:`HardwareInterface`.

The URDF (single source of truth) is loaded into MuJoCo with :class:`mujoco.MjSpec`
and completed programmatically:

* one position servo per joint, modelled as a MuJoCo ``position`` actuator
  (stiffness kp) plus a ``velocity`` actuator (damping kv with velocity
  feed-forward), integrated with ``implicitfast`` so the stiff servo is stable
  at a 1 ms step. Gains are derived from the largest joint-space inertia over
  the workspace corners so every axis is critically damped at its heaviest
  configuration and over-damped elsewhere (no overshoot anywhere);
* the total actuator force per joint is clamped to the URDF ``effort`` limit;
* gravity is compensated at the bodies (``gravcomp``): the real drives are
  non-backdrivable piezo motors with an integrating position loop, so gravity
  causes no steady-state error on the robot either;
* contacts are disabled: the mechanism has no contact-driven behaviour, and the
  primitive collision shapes (kept in the URDF for Gazebo and planners) would
  only add spurious self-contacts.

The motor controller is :class:`~igt_robot.hardware.controller_core.ControllerCore`, the same
model the firmware emulator runs: it servos at the physics rate (at least 1 kHz) in simulated
time, plays streamed PVT trajectories (begin_stream / push_points), ramps down at its own
deceleration limits on STOP, inhibit, a scanner-trigger edge (:meth:`MujocoHardware.set_scanner_trigger`),
buffer underrun, watchdog (optional here) or a fault, e-stop holds at once and latches,
out-of-range setpoints latch ``SETPOINT_RANGE`` (host-side guard), a large tracking error
latches ``FOLLOWING_ERROR``. Encoders are quantised (counts per m / per rad), optionally with
Gaussian noise and gear backlash (seeded).

Physics and controller advance by catch-up stepping: each interface call first replays the
simulation up to the wall clock (realtime mode) or time advances only via :meth:`advance`.
See :meth:`MujocoHardware._sync` for why this rather than a physics thread.

Units are SI (m, rad, s); joint order is the contract order.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections.abc import Mapping
from typing import Optional, Sequence

import numpy as np

# Headless offscreen rendering by default; an explicit user choice wins. Must be set
# before mujoco is imported because mujoco reads it at import time.
os.environ.setdefault('MUJOCO_GL', 'egl')

import mujoco  # noqa: E402

from igt_robot.hardware.controller_core import (  # noqa: E402
    DEFAULT_BUFFER_CAPACITY, DEFAULT_MAX_LOOKAHEAD, FEEDFORWARD_BRIDGE, FEEDFORWARD_MAX_PERIOD, FINISH_GAIN,
    AxisLimits, ControllerCore, Refusal)
from igt_robot.hardware.interface import (  # noqa: E402
    CommandRefused, HardwareError, HardwareFault, HardwareInterface, HardwareState, PvtPoint, StreamStatus)
from igt_robot.robot_model import RobotModel, load_robot_model  # noqa: E402
from igt_robot.hardware import protocol  # noqa: E402
from igt_robot.hardware.port_session import TriggerPortSession  # noqa: E402
from igt_robot.hardware.trigger_port_pty import TriggerPortPty  # noqa: E402

#: Axis acceleration limits (m/s², rad/s²) used for controlled stops; the same
#: figures as config/robot.yaml (the URDF has no acceleration limits).
DEFAULT_ACCEL_LIMITS = {'stage_x': 0.02, 'stage_y': 0.02, 'guide_pitch': 0.5, 'guide_yaw': 0.5,
                        'needle_insertion': 0.01}
#: Encoder resolution: 1 µm linear scales, 10 µrad rotary encoders.
DEFAULT_COUNTS_PER_UNIT = {'prismatic': 1.0e6, 'revolute': 1.0e5}
#: Tracking error that latches FOLLOWING_ERROR (m for prismatic, rad for revolute).
DEFAULT_FOLLOWING_ERROR_LIMIT = {'prismatic': 0.002, 'revolute': 0.035}
#: Servo bandwidth (rad/s) at the heaviest configuration; ~24 Hz, well above the
#: motion bandwidth yet with omega*dt << 1 at a 1 ms step.
SERVO_BANDWIDTH = 150.0
#: Longest stretch of wall time a realtime call replays in one go (s). It exceeds the watchdog
#: plus the longest buffered look-ahead, so any stall a stream could bridge is replayed in full
#: (and a longer one has already run the buffer dry); beyond it the simulation drops time.
MAX_CATCH_UP = 2.5
#: Below these speeds an axis counts as not moving (m/s, rad/s).
MOVING_SPEED = {'prismatic': 1e-5, 'revolute': 1e-4}
# Same nano-scale slack as the kinematics: a setpoint computed exactly on a limit
# must not fault because of floating-point round-off.
_LIMIT_SLACK = 1e-9
#: How far (encoder counts, plus backlash and 6 sigma of encoder noise) a stream's start may
#: differ from where the controller holds.
START_TOLERANCE_COUNTS = 50.0
#: The controller servos at least this fast (Hz); coarser physics steps are sub-divided.
MIN_SERVO_RATE = 1000.0

__all__ = ['MujocoHardware', 'measure_real_time_factor', 'FEEDFORWARD_BRIDGE', 'FEEDFORWARD_MAX_PERIOD',
           'FINISH_GAIN']

OVERVIEW_CAMERA = 'overview'
# What the simulated controller answers to HELLO on its trigger port.
SIMULATED_FIRMWARE_VERSION = (2, 0, 0)
SIMULATED_DEVICE_NAME = 'igt-mujoco-controller'


def _per_joint(value, model: RobotModel, name: str, default=None, positive=False) -> np.ndarray:
    """Expand a scalar / 5-sequence / mapping (by joint type or joint name) to a per-joint array."""
    if value is None:
        value = default
    if isinstance(value, Mapping):
        out = []
        for joint, jtype in zip(model.joint_names, model.joint_types):
            if joint in value:
                out.append(value[joint])
            elif jtype in value:
                out.append(value[jtype])
            else:
                raise ValueError(f'{name}: no value for joint {joint!r} (give it by joint name or '
                                 f'by joint type {jtype!r})')
        arr = np.array(out, dtype=float)
    else:
        arr = np.asarray(value, dtype=float)
        if arr.ndim == 0:
            arr = np.full(model.n_joints, float(arr))
        elif arr.shape != (model.n_joints,):
            raise ValueError(f'{name} must be a scalar, {model.n_joints} values or a mapping, '
                             f'got shape {arr.shape}')
    if not np.all(np.isfinite(arr)):
        raise ValueError(f'{name} must be finite, got {arr.tolist()}')
    if positive and np.any(arr <= 0):
        raise ValueError(f'{name} must be > 0 for every joint, got {arr.tolist()}')
    if not positive and np.any(arr < 0):
        raise ValueError(f'{name} must be >= 0 for every joint, got {arr.tolist()}')
    return arr


def _full_inertia(model: mujoco.MjModel, data: mujoco.MjData) -> np.ndarray:
    dense = np.zeros((model.nv, model.nv))
    try:
        mujoco.mj_fullM(model, data, dense)           # MuJoCo >= 4
    except TypeError:
        mujoco.mj_fullM(model, dense, data.qM)        # MuJoCo 3.x
    return dense


def _make_gl_context(width: int, height: int):
    """An offscreen OpenGL context: MUJOCO_GL's choice first, then EGL, then OSMesa."""
    preferred = os.environ.get('MUJOCO_GL', '').strip().lower()
    order = ['egl', 'osmesa']
    if preferred in order:
        order.remove(preferred)
        order.insert(0, preferred)
    errors = []
    for backend in order:
        try:
            if backend == 'egl':
                from mujoco.egl import GLContext
            else:
                from mujoco.osmesa import GLContext
            context = GLContext(width, height)
            context.make_current()
            return backend, context
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            errors.append(f'{backend}: {type(exc).__name__}: {exc}')
    raise HardwareError('cannot create an offscreen OpenGL context for MuJoCo rendering ('
                        + '; '.join(errors) + '); install EGL (GPU driver or Mesa) or OSMesa')


class _RenderContext:
    """GL context + MuJoCo render state; created lazily by :meth:`MujocoHardware.render`."""

    def __init__(self, model: mujoco.MjModel, width: int, height: int):
        self.width, self.height = width, height
        self.backend, self.gl = _make_gl_context(width, height)
        try:
            model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
            model.vis.global_.offheight = max(model.vis.global_.offheight, height)
            self.scene = mujoco.MjvScene(model, maxgeom=2000)
            self.option = mujoco.MjvOption()
            self.context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_100)
            mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self.context)
        except Exception as exc:
            self.free()
            raise HardwareError(f'MuJoCo render context setup failed on {self.backend}: {exc}') from exc

    def free(self):
        context = getattr(self, 'context', None)
        if context is not None:
            context.free()
            self.context = None
        if self.gl is not None:
            self.gl.free()
            self.gl = None


class MujocoHardware(HardwareInterface):
    """The needle guide simulated in MuJoCo, with controller-like safety semantics.

    Parameters (SI units):
        urdf_path: URDF to load (default: the repository/installed igt_robot.urdf).
        realtime: True -> read()/write() advance the physics to match the wall
            clock since connect(); False -> time only advances via :meth:`advance`.
        timestep: physics step (s), 1 ms by default.
        counts_per_unit: encoder counts per m (prismatic) / per rad (revolute):
            scalar, 5 values, or a mapping by joint type or joint name.
        noise_std: Gaussian encoder noise std (m / rad), scalar or 5 values.
        backlash: total lost motion per joint (m / rad), scalar or 5 values.
        seed: seed for the noise generator (reproducible runs).
        accel_limits: acceleration limit of the controller's motion profile, also
            the deceleration of stop/inhibit (m/s², rad/s²; default config/robot.yaml values).
        initial_positions: joint positions at connect() (default 0, needle retracted).
        following_error_limit: tracking error latching FOLLOWING_ERROR (m / rad).
        watchdog_timeout: host silence (s, simulated time) that latches WATCHDOG while enabled;
            None (default) = off, as a simulation driven by advance() has no host heartbeat.
        buffer_capacity, max_lookahead: the controller's trajectory buffer (points, s).
        trigger_port_link: path at which to offer the controller's trigger port (docs/serial_protocol.md §9)
            as a symlink to a pty served by a thread of this backend; None (default): no trigger port.
            Its silence limit is the watchdog timeout, or 0.3 s without one (simulated time).

    After :meth:`connect`, ``servo_gains`` holds the derived (kp, kv) per joint.
    """

    def __init__(self, urdf_path=None, realtime: bool = True, timestep: float = 0.001,
                 counts_per_unit=None, noise_std=0.0, backlash=0.0, seed: Optional[int] = None,
                 accel_limits=None, initial_positions=None, following_error_limit=None,
                 watchdog_timeout: Optional[float] = None, buffer_capacity: int = DEFAULT_BUFFER_CAPACITY,
                 max_lookahead: float = DEFAULT_MAX_LOOKAHEAD, trigger_port_link: Optional[str] = None):
        self.robot = load_robot_model(urdf_path)
        self.urdf_path = self.robot.urdf_path
        self.joint_names = self.robot.joint_names
        if not (isinstance(timestep, (int, float)) and math.isfinite(timestep) and 1e-5 <= timestep <= 0.01):
            raise ValueError(f'timestep must be between 1e-5 and 0.01 s, got {timestep!r}')
        self.timestep = float(timestep)
        self._servo_substeps = max(1, math.ceil(self.timestep * MIN_SERVO_RATE - 1e-9))
        if watchdog_timeout is not None and not (math.isfinite(watchdog_timeout) and watchdog_timeout > 0):
            raise ValueError(f'watchdog_timeout must be positive seconds or None, got {watchdog_timeout!r}')
        self.watchdog_timeout = watchdog_timeout
        self.buffer_capacity = int(buffer_capacity)
        self.max_lookahead = float(max_lookahead)
        self.realtime = bool(realtime)
        self.counts_per_unit = _per_joint(counts_per_unit, self.robot, 'counts_per_unit',
                                          DEFAULT_COUNTS_PER_UNIT, positive=True)
        self.noise_std = _per_joint(noise_std, self.robot, 'noise_std')
        self.backlash = _per_joint(backlash, self.robot, 'backlash')
        self.accel_limits = _per_joint(accel_limits, self.robot, 'accel_limits',
                                       DEFAULT_ACCEL_LIMITS, positive=True)
        self.following_error_limit = _per_joint(following_error_limit, self.robot, 'following_error_limit',
                                                DEFAULT_FOLLOWING_ERROR_LIMIT, positive=True)
        if initial_positions is None:
            initial = np.clip(np.zeros(self.robot.n_joints), self.robot.lower, self.robot.upper)
        else:
            initial = self.robot.check_joint_vector(initial_positions, 'initial_positions')
            violations = self.robot.limit_violations(initial)
            if violations:
                raise ValueError('initial_positions outside the joint limits: '
                                 + '; '.join(v.reason for v in violations))
        self._initial = initial
        self._moving_speed = _per_joint(MOVING_SPEED, self.robot, 'moving speed', positive=True)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.RLock()
        self._model = None
        self._data = None
        self._render = None
        self._connected = False
        self.core: Optional[ControllerCore] = None
        self.servo_gains = None   # (kp, kv) per joint, known after connect()
        self.trigger_port_link = trigger_port_link or None
        self.trigger_port: Optional[TriggerPortSession] = None
        self._trigger_pty: Optional[TriggerPortPty] = None

    # ================================================================ model construction

    def _build_model(self) -> mujoco.MjModel:
        spec = mujoco.MjSpec.from_file(str(self.urdf_path))
        spec.option.timestep = self.timestep
        spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
        spec.option.disableflags |= int(mujoco.mjtDisableBit.mjDSBL_CONTACT)
        for body in spec.bodies:
            if body.name not in ('world', 'base_link'):
                body.gravcomp = 1.0
        world = spec.worldbody
        world.add_light(pos=[0.0, -0.3, 0.8], dir=[0.0, 0.3, -0.8], diffuse=[0.6, 0.6, 0.6])
        world.add_light(pos=[0.4, 0.4, 0.6], dir=[-0.4, -0.4, -0.6], diffuse=[0.3, 0.3, 0.3])
        world.add_camera(name=OVERVIEW_CAMERA, pos=[0.24, -0.28, 0.22],
                         mode=mujoco.mjtCamLight.mjCAMLIGHT_TARGETBODY, targetbody='stage_y_link')

        model = spec.compile()
        names = tuple(model.joint(i).name for i in range(model.njnt))
        if names != self.joint_names:
            raise HardwareError(f'MuJoCo joints {names} differ from the URDF joint order {self.joint_names}')
        kp, kv = self._servo_gains(model)
        for i, joint in enumerate(self.joint_names):
            position = spec.add_actuator(name=f'{joint}_position', target=joint,
                                         trntype=mujoco.mjtTrn.mjTRN_JOINT)
            position.set_to_position(kp=float(kp[i]), kv=0.0)
            velocity = spec.add_actuator(name=f'{joint}_velocity', target=joint,
                                         trntype=mujoco.mjtTrn.mjTRN_JOINT)
            velocity.set_to_velocity(kv=float(kv[i]))
        self.servo_gains = (kp, kv)
        return spec.compile()

    def _servo_gains(self, model: mujoco.MjModel):
        """kp, kv per joint: critically damped at the largest reflected inertia.

        The joint-space inertia of pitch/yaw grows with needle insertion, so the
        heaviest corner of the workspace sets the gains; lighter configurations
        are then over-damped, never oscillatory.
        """
        data = mujoco.MjData(model)
        lo, hi = self.robot.lower, self.robot.upper
        worst = np.zeros(model.nv)
        for corner in itertools.product((0, 1), repeat=model.nq):
            data.qpos[:] = np.where(np.array(corner) == 1, hi, lo)
            mujoco.mj_forward(model, data)
            worst = np.maximum(worst, np.diag(_full_inertia(model, data)))
        # Keep omega*dt small for coarser user-chosen steps.
        omega = min(SERVO_BANDWIDTH, 0.15 / self.timestep)
        return worst * omega ** 2, 2.0 * worst * omega

    # ================================================================ lifecycle

    def connect(self) -> None:
        """Build the simulation (idempotent). The robot starts disabled at ``initial_positions``."""
        with self._lock:
            if self._connected:
                return
            self._model = self._build_model()
            self._data = mujoco.MjData(self._model)
            n = self.robot.n_joints
            # One-DOF joints in chain order: qpos/qvel are the joint vector (slices are cheap).
            if (list(self._model.jnt_qposadr) != list(range(n)) or list(self._model.jnt_dofadr) != list(range(n))):
                raise HardwareError('unexpected MuJoCo joint layout; every URDF joint must be 1-DOF')
            self._qadr = self._vadr = slice(0, n)
            self._data.qpos[self._qadr] = self._initial
            mujoco.mj_forward(self._model, self._data)
            # The simulated motor controller: the same core the firmware emulator runs, servoing
            # at the physics rate (or a whole multiple of it) in simulated time.
            resolution = 1.0 / self.counts_per_unit
            axes = [AxisLimits(float(lo), float(up), float(v), float(a), float(r), name)
                    for name, lo, up, v, a, r in zip(self.joint_names, self.robot.lower, self.robot.upper,
                                                     self.robot.velocity, self.accel_limits, resolution)]
            self.core = ControllerCore(
                axes, servo_period=self.timestep / self._servo_substeps, watchdog_timeout=self.watchdog_timeout,
                buffer_capacity=self.buffer_capacity, max_lookahead=self.max_lookahead,
                start_tolerance=START_TOLERANCE_COUNTS * resolution + self.backlash + 6.0 * self.noise_std,
                positions=self._initial, measure=lambda: self._data.qpos[self._qadr].copy())
            self._out_pos = self._initial.copy()
            self._out_vel = np.zeros(n)
            self._half_play = 0.5 * self.backlash
            self._setpoint_faults = []         # host-side guard faults (SETPOINT_RANGE), see write()
            self._advance_residual = 0.0
            self._counters = {'physics_steps': 0, 'writes': 0, 'refused_writes': 0, 'dropped_time': 0.0}
            self._t0 = time.monotonic()
            self._connected = True
            if self.trigger_port_link:
                self.trigger_port = TriggerPortSession(self.core, self._hello_reply)
                self._trigger_pty = TriggerPortPty(self._on_trigger_port_bytes, self.trigger_port_link)
                self._trigger_pty.open()

    def _hello_reply(self) -> protocol.HelloReply:
        return protocol.HelloReply(protocol.PROTOCOL_VERSION, SIMULATED_FIRMWARE_VERSION, self.robot.n_joints,
                                   int(round(self.core.trigger_port_timeout * 1000)), SIMULATED_DEVICE_NAME)

    def _on_trigger_port_bytes(self, data: bytes) -> list:
        """The trigger port's bytes (its own thread): the physics and the controller catch up first, as for
        a host call, so the level acts at the simulated instant it arrived."""
        with self._lock:
            if not self._connected or self.trigger_port is None:
                return []
            self._sync()
            return self.trigger_port.receive(data)

    def close(self) -> None:
        """Hold position and release the simulation (idempotent)."""
        pty = self._trigger_pty
        if pty is not None:
            pty.close()                        # outside the lock: its thread may be waiting for it
        with self._lock:
            self._trigger_pty = None
            self.trigger_port = None
            if not self._connected:
                return
            if self._render is not None:
                self._render.free()
                self._render = None
            self._model = None
            self._data = None
            self.core = None
            self._connected = False

    def _require_connected(self, action: str) -> None:
        if not self._connected:
            raise HardwareError(f'cannot {action}: the MuJoCo backend is not connected (call connect())')

    def _host_call(self, action: str) -> ControllerCore:
        """Every interface call is a frame from the host: catch the physics up, feed the watchdog."""
        self._require_connected(action)
        self._sync()
        self.core.host_seen()
        return self.core

    # ================================================================ time

    @property
    def sim_time(self) -> float:
        """Simulated time since connect() (s)."""
        with self._lock:
            self._require_connected('read the simulation time')
            return float(self._data.time)

    def _sync(self) -> None:
        """Realtime mode: step the physics until simulated time catches up with the wall clock.

        Catch-up stepping instead of a physics thread: nothing outside can observe the
        simulation except through these calls, and each call first replays the physics (and the
        controller, in simulated time) up to now, so the result is exactly what a controller
        running on its own would have done meanwhile -- a host stall shorter than the buffer
        changes nothing -- without a Python 1 kHz thread competing for the host's GIL.
        """
        if not self.realtime:
            return
        behind = (time.monotonic() - self._t0) - self._data.time
        steps = int(behind / self.timestep)
        max_steps = int(MAX_CATCH_UP / self.timestep)
        if steps > max_steps:
            # Longer than any stream can bridge: the replayed MAX_CATCH_UP already saw the
            # buffer run dry (and the watchdog, if enabled); drop the rest rather than lock up.
            skipped = (steps - max_steps) * self.timestep
            self._t0 += skipped
            self._counters['dropped_time'] += skipped
            steps = max_steps
        for _ in range(steps):
            self._step_once()

    def advance(self, duration: float) -> float:
        """Non-realtime mode: simulate ``duration`` seconds now; returns the simulated time (s).

        Durations that are not a multiple of the timestep carry their remainder over
        to the next call, so the simulated clock never drifts.
        """
        if not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration >= 0):
            raise ValueError(f'duration must be a finite number of seconds >= 0, got {duration!r}')
        with self._lock:
            self._require_connected('advance the simulation')
            if self.realtime:
                raise HardwareError('advance() is for realtime=False; a realtime backend follows the wall clock')
            total = duration + self._advance_residual
            steps = int(math.floor(total / self.timestep + 1e-9))
            self._advance_residual = max(total - steps * self.timestep, 0.0)
            for _ in range(steps):
                self._step_once()
            return float(self._data.time)

    # ================================================================ the simulated controller

    def _step_once(self) -> None:
        core = self.core
        for _ in range(self._servo_substeps):
            core.step()
        self._update_output()
        self._data.ctrl[0::2] = self._out_pos       # actuators alternate position, velocity
        self._data.ctrl[1::2] = self._out_vel
        mujoco.mj_step(self._model, self._data)
        self._counters['physics_steps'] += 1
        self._check_following_error()

    def _update_output(self) -> None:
        """The joint-side servo reference: the controller's reference through the backlash.

        The joint side only follows once the motor has taken up the play.
        """
        ref = self.core.ref_pos
        half_play = self._half_play
        new_out = np.minimum(np.maximum(self._out_pos, ref - half_play), ref + half_play)
        self._out_vel = (new_out - self._out_pos) / self.timestep
        self._out_pos = new_out

    def _check_following_error(self) -> None:
        core = self.core
        if not core.enabled or 'FOLLOWING_ERROR' in core.faults:
            return
        error = np.abs(self._data.qpos[self._qadr] - self._out_pos)
        over = np.flatnonzero(error > self.following_error_limit)
        if over.size:
            core.latch_fault('FOLLOWING_ERROR', int(over[0]))

    # ================================================================ HardwareInterface

    def enable(self) -> None:
        """Energise the axes, holding the current position. Refused while e-stopped or faulted."""
        with self._lock:
            core = self._host_call('enable')
            if self._setpoint_faults:
                raise HardwareError('cannot enable: ' + self._blocking_reason() + '; call reset_faults() first')
            try:
                core.enable()
            except Refusal as exc:
                raise HardwareError('cannot enable: ' + self._blocking_reason() + '; call reset_faults() first') \
                    from exc
            self._out_pos = np.asarray(core.ref_pos, dtype=float).copy()

    def disable(self) -> None:
        """Stop (decelerate, then de-energise) and refuse setpoints until enable().

        The MR-safe piezo drives are non-backdrivable, so a disabled axis keeps its
        position; the simulation models that by holding the last reference.
        """
        with self._lock:
            self._host_call('disable').disable()

    def read(self) -> HardwareState:
        """Encoder-quantised positions (with optional noise) and joint velocities.

        ``stamp`` is the monotonic time of the reading on the simulated clock
        (connect time + simulated time; equal to the wall clock in realtime mode).
        """
        with self._lock:
            core = self._host_call('read')
            q = self._data.qpos[self._qadr].copy()
            qd = self._data.qvel[self._vadr].copy()
            if np.any(self.noise_std > 0):
                q = q + self._rng.normal(0.0, 1.0, q.shape) * self.noise_std
            positions = np.round(q * self.counts_per_unit) / self.counts_per_unit
            moving = core.moving or bool(np.any(np.abs(qd) > self._moving_speed))
            counters = dict(self._counters)
            counters.update(sim_time=float(self._data.time), underruns=core.underruns,
                            watchdog_trips=core.watchdog_trips, scanner_trigger_edges=core.trigger_edges)
            return HardwareState(
                stamp=self._t0 + float(self._data.time),
                positions=positions,
                velocities=qd,
                enabled=core.enabled,
                motion_inhibited=core.inhibited,
                estopped=core.estop,
                moving=moving,
                faults=self._faults(),
                scanner_trigger=core.trigger,
                firmware_version=f'mujoco-{mujoco.__version__}',
                counters=counters,
                inhibit_cause=core.inhibit_cause,
                stream=core.stream_status(),
            )

    def _faults(self) -> tuple:
        return tuple(self.core.faults) + tuple(f for f in self._setpoint_faults if f not in self.core.faults)

    def write(self, positions: Sequence[float], velocities: Optional[Sequence[float]] = None) -> None:
        """Command joint position setpoints (m / rad, contract order).

        Refused with :class:`HardwareError` when disabled, inhibited, e-stopped,
        faulted or while a trajectory stream runs; an out-of-range or non-finite
        setpoint (or a feed-forward velocity above the joint limit) latches
        ``SETPOINT_RANGE`` (a host-side guard: the axes stop but stay energised)
        and raises :class:`HardwareFault`. The controller tracks the setpoint
        within its velocity and acceleration limits with the feed-forward given
        (or estimated from successive setpoints; see ControllerCore.set_target).
        """
        with self._lock:
            core = self._host_call('write')
            n = self.robot.n_joints
            target = np.asarray(positions, dtype=float)
            if target.shape != (n,):
                self._counters['refused_writes'] += 1
                raise ValueError(f'write() needs {n} positions ({", ".join(self.joint_names)}), '
                                 f'got shape {target.shape}')
            if core.estop or core.faults or self._setpoint_faults or not core.enabled or core.inhibited:
                self._counters['refused_writes'] += 1
                raise HardwareError('setpoint refused: ' + self._blocking_reason())
            problems = self._setpoint_problems(target, velocities)
            if problems:
                self._counters['refused_writes'] += 1
                self._setpoint_faults.append('SETPOINT_RANGE')
                core.stop()            # a faulted controller brings running motion to a stop
                raise HardwareFault('SETPOINT_RANGE', 'setpoint refused: ' + '; '.join(problems))
            try:
                core.set_target(np.clip(target, self.robot.lower, self.robot.upper),
                                feedforward=None if velocities is None else np.asarray(velocities, dtype=float))
            except Refusal as exc:
                self._counters['refused_writes'] += 1
                raise CommandRefused(exc.reason, f'setpoint refused: {exc}') from None
            self._counters['writes'] += 1

    def _setpoint_problems(self, target: np.ndarray, velocities) -> list:
        if not np.isfinite(target).all():
            bad = [j for j, v in zip(self.joint_names, target) if not np.isfinite(v)]
            return [f'non-finite position for {", ".join(bad)}']
        inside = ((target >= self.robot.lower - _LIMIT_SLACK).all()
                  and (target <= self.robot.upper + _LIMIT_SLACK).all())
        problems = [] if inside else [
            v.reason for v in self.robot.limit_violations(target, tolerance=_LIMIT_SLACK)]
        if velocities is not None:
            vel = np.asarray(velocities, dtype=float)
            if vel.shape != target.shape:
                return problems + [f'{vel.shape} velocities for {target.shape} positions']
            for i, joint in enumerate(self.joint_names):
                if not np.isfinite(vel[i]):
                    problems.append(f'non-finite velocity for {joint}')
                elif abs(vel[i]) > self.robot.velocity[i] * (1 + 1e-9):
                    problems.append(f'{joint} velocity {self.robot.format_amount(joint, abs(vel[i]))}/s '
                                    f'above the {self.robot.format_amount(joint, self.robot.velocity[i])}/s limit')
        return problems

    def _blocking_reason(self) -> str:
        core = self.core
        if core.estop or core.estop_input:
            return 'emergency stop latched'
        faults = self._faults()
        if faults:
            return 'faults latched: ' + ', '.join(faults)
        if not core.enabled or core.stopping_to_off:
            return 'axes disabled (call enable())'
        if core.inhibited:
            return f'motion inhibited (cause {core.inhibit_cause})'
        return 'ready'

    def stop(self) -> None:
        """Controlled stop: decelerate at the axis acceleration limits, then hold (cause STOP)."""
        with self._lock:
            self._host_call('stop').stop()

    def emergency_stop(self) -> None:
        """Hold the current position at once, disable, and latch until reset_faults()."""
        with self._lock:
            self._host_call('emergency stop').emergency_stop()

    def set_motion_inhibit(self, inhibit: bool) -> None:
        """Inhibit: decelerate to a stop and hold, refusing motion until cleared.

        Releasing it is refused (:class:`CommandRefused` ``TRIGGER_ACTIVE``) while the
        simulated scanner-trigger input says imaging.
        """
        with self._lock:
            core = self._host_call('set motion inhibit')
            try:
                core.set_inhibit(bool(inhibit))
            except Refusal as exc:
                raise CommandRefused(exc.reason, f'motion inhibit not released: {exc}') from None

    def reset_faults(self) -> None:
        """Clear latched faults and the e-stop; the axes stay disabled until enable()."""
        with self._lock:
            core = self._host_call('reset faults')
            try:
                core.reset_faults()
            except Refusal as exc:
                raise CommandRefused(exc.reason, f'faults not reset: {exc}') from None
            self._setpoint_faults = []

    def heartbeat(self) -> None:
        """Feed the simulated controller's watchdog (every other call does too)."""
        with self._lock:
            self._host_call('heartbeat')

    # ---------------------------------------------------------------- trajectory streaming

    def begin_stream(self, start_positions: Sequence[float]) -> int:
        with self._lock:
            core = self._host_call('begin a stream')
            if self._setpoint_faults:
                raise CommandRefused('FAULTED', 'stream refused: ' + self._blocking_reason())
            try:
                return core.begin_stream(np.asarray(start_positions, dtype=float))
            except Refusal as exc:
                raise CommandRefused(exc.reason, f'stream refused: {exc}') from None

    def push_points(self, stream_id: int, points: Sequence[PvtPoint], final: bool = False) -> StreamStatus:
        with self._lock:
            core = self._host_call('push trajectory points')
            try:
                return core.push_points(int(stream_id), list(points), final=final)
            except Refusal as exc:
                raise CommandRefused(exc.reason, f'points refused: {exc}') from None

    def stream_status(self) -> StreamStatus:
        with self._lock:
            return self._host_call('read the stream status').stream_status()

    # ---------------------------------------------------------------- simulated inputs

    def set_scanner_trigger(self, imaging: bool) -> None:
        """The controller's scanner-trigger input (simulation only): a rising edge stops
        motion at once (cause TRIGGER) and latches the inhibit until the host releases it
        after the trigger has fallen."""
        with self._lock:
            self._require_connected('set the scanner trigger')
            self._sync()
            self.core.set_trigger(bool(imaging))

    def apply_external_force(self, joint_forces) -> None:
        """Apply a disturbance (N for prismatic, N·m for revolute joints) held until changed.

        For tests and fault drills, e.g. a collision pushing an axis: a disturbance
        above the joint's effort limit overpowers the servo and latches FOLLOWING_ERROR.
        Pass zeros to remove it.
        """
        forces = self.robot.check_joint_vector(joint_forces, 'joint_forces')
        with self._lock:
            self._require_connected('apply an external force')
            self._sync()
            self._data.qfrc_applied[self._vadr] = forces

    # ================================================================ rendering

    def render(self, width: int = 640, height: int = 480, camera=None) -> np.ndarray:
        """Offscreen RGB image (height, width, 3) uint8 of the current state.

        ``camera``: None for the built-in overview camera, or a camera name/id of
        the model. Uses EGL (MUJOCO_GL=egl) and falls back to OSMesa; raises
        :class:`HardwareError` when no offscreen GL context can be created.
        """
        for value, name in ((width, 'width'), (height, 'height')):
            if not isinstance(value, (int, np.integer)) or not 1 <= value <= 8192:
                raise ValueError(f'{name} must be an integer in [1, 8192] pixels, got {value!r}')
        with self._lock:
            self._require_connected('render')
            self._sync()
            cam = mujoco.MjvCamera()
            cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
            cam.fixedcamid = self._camera_id(OVERVIEW_CAMERA if camera is None else camera)
            if self._render is None or width > self._render.width or height > self._render.height:
                if self._render is not None:
                    self._render.free()
                    self._render = None
                self._render = _RenderContext(self._model, max(width, 640), max(height, 480))
            ctx = self._render
            ctx.gl.make_current()
            viewport = mujoco.MjrRect(0, 0, width, height)
            mujoco.mjv_updateScene(self._model, self._data, ctx.option, None, cam,
                                   int(mujoco.mjtCatBit.mjCAT_ALL), ctx.scene)
            mujoco.mjr_render(viewport, ctx.scene, ctx.context)
            rgb = np.empty((height, width, 3), dtype=np.uint8)
            mujoco.mjr_readPixels(rgb, None, viewport, ctx.context)
            return np.ascontiguousarray(np.flipud(rgb))

    def _camera_id(self, camera) -> int:
        if isinstance(camera, (int, np.integer)) and 0 <= camera < self._model.ncam:
            return int(camera)
        if isinstance(camera, str):
            cam_id = mujoco.mj_name2id(self._model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
            if cam_id >= 0:
                return cam_id
        names = [self._model.camera(i).name for i in range(self._model.ncam)]
        raise ValueError(f'unknown camera {camera!r}; the model has {names}')


def measure_real_time_factor(seconds: float = 2.0, control_rate_hz: float = 1000.0) -> float:
    """Simulated seconds per wall second with a host control loop at ``control_rate_hz``.

    Runs a non-realtime :class:`MujocoHardware` for ``seconds`` of simulated time,
    doing read() + write() (a slow multi-axis sinusoid within the velocity limits)
    + advance(1/rate) each control period, as fast as the host allows. A result
    above 1 means the simulation keeps up with a real 1 kHz loop.
    """
    if not (seconds > 0 and control_rate_hz > 0):
        raise ValueError('seconds and control_rate_hz must be positive')
    hardware = MujocoHardware(realtime=False)
    hardware.connect()
    try:
        hardware.enable()
        robot = hardware.robot
        centre = 0.5 * (robot.lower + robot.upper)
        centre[-1] = robot.lower[-1] + 0.25 * (robot.upper[-1] - robot.lower[-1])
        frequency = 0.1   # Hz; amplitude below keeps the speed under half the limit
        amplitude = 0.5 * robot.velocity / (2 * math.pi * frequency)
        amplitude = np.minimum(amplitude, 0.25 * (robot.upper - robot.lower))
        period = 1.0 / control_rate_hz
        cycles = int(round(seconds * control_rate_hz))
        start_sim = hardware.sim_time
        start = time.perf_counter()
        for k in range(cycles):
            hardware.read()
            phase = 2 * math.pi * frequency * k * period
            hardware.write(centre + amplitude * math.sin(phase))
            hardware.advance(period)
        wall = time.perf_counter() - start
        return (hardware.sim_time - start_sim) / wall
    finally:
        hardware.close()
