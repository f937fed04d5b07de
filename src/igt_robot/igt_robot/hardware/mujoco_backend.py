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

Controller behaviour mirrored from the firmware contract (see interface.py):
setpoints are rate-limited to the URDF joint velocity limits, stop/inhibit
decelerate at the axis acceleration limits and hold, e-stop holds at once and
latches, out-of-range setpoints latch ``SETPOINT_RANGE``, a large tracking error
latches ``FOLLOWING_ERROR``. Encoders are quantised (counts per m / per rad),
optionally with Gaussian noise and gear backlash (seeded).

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

from igt_robot.hardware.interface import (  # noqa: E402
    HardwareError, HardwareFault, HardwareInterface, HardwareState)
from igt_robot.robot_model import RobotModel, load_robot_model  # noqa: E402

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
#: Longest stretch of wall time a realtime read()/write() simulates in one call (s);
#: beyond it the simulation drops time instead of stalling the caller.
MAX_CATCH_UP = 0.25
#: Below these speeds an axis counts as not moving (m/s, rad/s).
MOVING_SPEED = {'prismatic': 1e-5, 'revolute': 1e-4}
# Same nano-scale slack as the kinematics: a setpoint computed exactly on a limit
# must not fault because of floating-point round-off.
_LIMIT_SLACK = 1e-9

#: Gain (1/s) of the linear finish of the reference onto its target (~33 ms time constant).
FINISH_GAIN = 30.0
#: Setpoints further apart than this (s) are not a stream: no velocity feed-forward
#: is estimated from them, and explicit feed-forward expires after this long.
FEEDFORWARD_MAX_PERIOD = 0.1
#: A streamed setpoint's feed-forward is extrapolated for at least this long (s), as a drive in
#: cyclic-synchronous mode bridges a few late host cycles: a host that is late by up to this much
#: does not make the axis brake and then lag behind its trajectory. A host that falls silent drags the
#: axis at most v_max * FEEDFORWARD_BRIDGE past its last setpoint (0.5 mm at 10 mm/s).
FEEDFORWARD_BRIDGE = 0.05

OVERVIEW_CAMERA = 'overview'


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

    After :meth:`connect`, ``servo_gains`` holds the derived (kp, kv) per joint.
    """

    def __init__(self, urdf_path=None, realtime: bool = True, timestep: float = 0.001,
                 counts_per_unit=None, noise_std=0.0, backlash=0.0, seed: Optional[int] = None,
                 accel_limits=None, initial_positions=None, following_error_limit=None):
        self.robot = load_robot_model(urdf_path)
        self.urdf_path = self.robot.urdf_path
        self.joint_names = self.robot.joint_names
        if not (isinstance(timestep, (int, float)) and math.isfinite(timestep) and 1e-5 <= timestep <= 0.01):
            raise ValueError(f'timestep must be between 1e-5 and 0.01 s, got {timestep!r}')
        self.timestep = float(timestep)
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
        self.servo_gains = None   # (kp, kv) per joint, known after connect()

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
            self._target = self._initial.copy()
            self._ref_pos = self._initial.copy()
            self._ref_vel = np.zeros(n)
            self._out_pos = self._initial.copy()
            self._out_vel = np.zeros(n)
            self._mode = 'hold'
            self._ff = np.zeros(n)
            self._ff_expiry = 0.0
            self._last_write_time = None
            self._last_write_target = self._initial.copy()
            self._snap_distance = 0.5 / self.counts_per_unit
            self._a_dt = self.accel_limits * self.timestep
            self._half_play = 0.5 * self.backlash
            self._enabled = False
            self._inhibited = False
            self._estopped = False
            self._faults = []
            self._advance_residual = 0.0
            self._counters = {'physics_steps': 0, 'writes': 0, 'refused_writes': 0, 'dropped_time': 0.0}
            self._t0 = time.monotonic()
            self._connected = True

    def close(self) -> None:
        """Hold position and release the simulation (idempotent)."""
        with self._lock:
            if not self._connected:
                return
            self._enabled = False
            if self._render is not None:
                self._render.free()
                self._render = None
            self._model = None
            self._data = None
            self._connected = False

    def _require_connected(self, action: str) -> None:
        if not self._connected:
            raise HardwareError(f'cannot {action}: the MuJoCo backend is not connected (call connect())')

    # ================================================================ time

    @property
    def sim_time(self) -> float:
        """Simulated time since connect() (s)."""
        with self._lock:
            self._require_connected('read the simulation time')
            return float(self._data.time)

    def _sync(self) -> None:
        """Realtime mode: step the physics until simulated time catches up with the wall clock."""
        if not self.realtime:
            return
        behind = (time.monotonic() - self._t0) - self._data.time
        steps = int(behind / self.timestep)
        max_steps = int(MAX_CATCH_UP / self.timestep)
        if steps > max_steps:
            # The caller stalled (debugger, overloaded host): skip rather than lock up.
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
        self._update_reference()
        self._data.ctrl[0::2] = self._out_pos       # actuators alternate position, velocity
        self._data.ctrl[1::2] = self._out_vel
        mujoco.mj_step(self._model, self._data)
        self._counters['physics_steps'] += 1
        self._check_following_error()

    def _update_reference(self) -> None:
        """Advance the motor-side reference one step, then the joint side through the backlash.

        Tracking law per axis (e = target - reference), acceleration- and velocity-limited::

            v_des = clip(v_ff + sign(e) * min(sqrt(a |e|), K_FINISH |e|), -v_max, v_max)
            v    += clip(v_des - v, -a dt, a dt)

        sqrt(a|e|) is the braking curve for half the axis deceleration, so a discrete
        step can always stay on it (no overshoot); K_FINISH |e| gives a smooth
        exponential finish; the reference snaps onto a static target once within
        half an encoder count at a speed it can shed in one step. The servo thus
        sees a smooth reference and the joints never exceed the URDF velocity limit
        by more than the servo's small tracking transient.
        """
        if self._mode == 'hold' and not self._out_vel.any():
            return      # at rest with the play settled: nothing changes (the common case)
        dt = self.timestep
        a_dt = self._a_dt
        v = self._ref_vel
        lower, upper, v_max = self.robot.lower, self.robot.upper, self.robot.velocity
        if self._mode == 'track':
            target = self._target
            if self._data.time < self._ff_expiry:
                # Streaming: the setpoint describes a moving trajectory point, so follow
                # it extrapolated along its velocity until the next setpoint is due.
                feedforward = self._ff
                elapsed = self._data.time - self._last_write_time
                target = np.minimum(np.maximum(target + feedforward * elapsed, lower), upper)
            else:
                feedforward = np.zeros_like(v)
            err = target - self._ref_pos
            distance = np.abs(err)
            magnitude = np.minimum(np.sqrt(self.accel_limits * distance), FINISH_GAIN * distance)
            v_des = np.minimum(np.maximum(feedforward + np.sign(err) * magnitude, -v_max), v_max)
        else:   # 'stopping' decelerates to rest; 'hold' stays at rest
            feedforward = np.zeros_like(v)
            v_des = np.zeros_like(v)
        v_new = v + np.minimum(np.maximum(v_des - v, -a_dt), a_dt)
        ref = np.minimum(np.maximum(self._ref_pos + 0.5 * (v + v_new) * dt, lower), upper)
        if self._mode == 'track':
            arrived = ((feedforward == 0.0) & (np.abs(target - ref) <= self._snap_distance)
                       & (np.abs(v_new) <= a_dt))
            ref = np.where(arrived, target, ref)
            v_new = np.where(arrived, 0.0, v_new)
        self._ref_pos, self._ref_vel = ref, v_new
        if self._mode == 'stopping' and not v_new.any():
            self._hold_reference()
        # Backlash: the joint side only follows once the motor has taken up the play.
        half_play = self._half_play
        new_out = np.minimum(np.maximum(self._out_pos, self._ref_pos - half_play), self._ref_pos + half_play)
        self._out_vel = (new_out - self._out_pos) / dt
        self._out_pos = new_out

    def _hold_reference(self) -> None:
        self._mode = 'hold'
        self._ref_vel = np.zeros_like(self._ref_vel)
        self._target = self._ref_pos.copy()
        # A stream interrupted by a stop starts afresh: no feed-forward across it.
        self._ff = np.zeros_like(self._ref_vel)
        self._ff_expiry = 0.0
        self._last_write_time = None

    def _hold_here(self) -> None:
        """Freeze every reference at the measured joint positions (immediate stop)."""
        q = self._data.qpos[self._qadr].copy()
        self._ref_pos = q.copy()
        self._out_pos = q.copy()
        self._out_vel = np.zeros_like(q)
        self._hold_reference()

    def _check_following_error(self) -> None:
        error = np.abs(self._data.qpos[self._qadr] - self._out_pos)
        if (error > self.following_error_limit).any() and 'FOLLOWING_ERROR' not in self._faults:
            self._faults.append('FOLLOWING_ERROR')
            self._enabled = False
            self._hold_here()

    def _latch(self, code: str) -> None:
        if code not in self._faults:
            self._faults.append(code)

    # ================================================================ HardwareInterface

    def enable(self) -> None:
        """Energise the axes, holding the current position. Refused while e-stopped or faulted."""
        with self._lock:
            self._require_connected('enable')
            self._sync()
            if self._estopped or self._faults:
                raise HardwareError('cannot enable: ' + self._blocking_reason()
                                    + '; call reset_faults() first')
            if not self._enabled:
                self._hold_here()
                self._enabled = True

    def disable(self) -> None:
        """Stop (decelerate, then hold) and refuse setpoints until enable().

        The MR-safe piezo drives are non-backdrivable, so a disabled axis keeps its
        position; the simulation models that by holding the last reference.
        """
        with self._lock:
            self._require_connected('disable')
            self._sync()
            self._enabled = False
            self._begin_stop()

    def read(self) -> HardwareState:
        """Encoder-quantised positions (with optional noise) and joint velocities.

        ``stamp`` is the monotonic time of the reading on the simulated clock
        (connect time + simulated time; equal to the wall clock in realtime mode).
        """
        with self._lock:
            self._require_connected('read')
            self._sync()
            q = self._data.qpos[self._qadr].copy()
            qd = self._data.qvel[self._vadr].copy()
            if np.any(self.noise_std > 0):
                q = q + self._rng.normal(0.0, 1.0, q.shape) * self.noise_std
            positions = np.round(q * self.counts_per_unit) / self.counts_per_unit
            moving = (self._mode == 'stopping' or bool(np.any(self._ref_vel))
                      or (self._mode == 'track' and not np.array_equal(self._ref_pos, self._target))
                      or bool(np.any(np.abs(qd) > self._moving_speed)))
            counters = dict(self._counters)
            counters['sim_time'] = float(self._data.time)
            return HardwareState(
                stamp=self._t0 + float(self._data.time),
                positions=positions,
                velocities=qd,
                enabled=self._enabled,
                motion_inhibited=self._inhibited,
                estopped=self._estopped,
                moving=moving,
                faults=tuple(self._faults),
                scanner_trigger=False,
                firmware_version=f'mujoco-{mujoco.__version__}',
                counters=counters,
            )

    def write(self, positions: Sequence[float], velocities: Optional[Sequence[float]] = None) -> None:
        """Command joint position setpoints (m / rad, contract order).

        Refused with :class:`HardwareError` when disabled, inhibited, e-stopped or
        faulted; an out-of-range or non-finite setpoint (or a feed-forward velocity
        above the joint limit) latches ``SETPOINT_RANGE`` and raises
        :class:`HardwareFault`. Feed-forward velocities are validated; the simulated
        servo derives its own feed-forward from the rate-limited reference.
        """
        with self._lock:
            self._require_connected('write')
            self._sync()
            n = self.robot.n_joints
            target = np.asarray(positions, dtype=float)
            if target.shape != (n,):
                self._counters['refused_writes'] += 1
                raise ValueError(f'write() needs {n} positions ({", ".join(self.joint_names)}), '
                                 f'got shape {target.shape}')
            if self._estopped or self._faults or not self._enabled or self._inhibited:
                self._counters['refused_writes'] += 1
                raise HardwareError('setpoint refused: ' + self._blocking_reason())
            problems = self._setpoint_problems(target, velocities)
            if problems:
                self._counters['refused_writes'] += 1
                self._latch('SETPOINT_RANGE')
                self._begin_stop()   # a faulted controller brings running motion to a stop
                raise HardwareFault('SETPOINT_RANGE', 'setpoint refused: ' + '; '.join(problems))
            self._set_feedforward(target, velocities)
            self._target = np.clip(target, self.robot.lower, self.robot.upper)
            self._mode = 'track'
            self._counters['writes'] += 1

    def _set_feedforward(self, target: np.ndarray, velocities) -> None:
        """Velocity feed-forward for a streamed trajectory, valid until the next setpoint is due.

        Explicit ``velocities`` win; otherwise the velocity is estimated from the
        last two setpoints. It expires 1.5 write periods after the write, but not
        before FEEDFORWARD_BRIDGE (late host cycles are bridged) and not after 0.1 s,
        so a stream that ends, or a host that falls silent, drags an axis only a
        bounded distance past its last setpoint.
        """
        now = float(self._data.time)
        interval = None if self._last_write_time is None else now - self._last_write_time
        if interval == 0.0:
            # Another setpoint within the same physics step: keep the current estimate.
            if velocities is not None:
                self._ff = np.clip(np.asarray(velocities, dtype=float), -self.robot.velocity, self.robot.velocity)
            return
        streaming = interval is not None and interval <= FEEDFORWARD_MAX_PERIOD
        if velocities is not None:
            ff = np.asarray(velocities, dtype=float)
        elif streaming:
            ff = (target - self._last_write_target) / interval
        else:
            ff = np.zeros_like(target)
        self._ff = np.clip(ff, -self.robot.velocity, self.robot.velocity)
        self._ff_expiry = now + (max(1.5 * interval, FEEDFORWARD_BRIDGE) if streaming else FEEDFORWARD_MAX_PERIOD)
        self._last_write_time = now
        self._last_write_target = target.copy()

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
        if self._estopped:
            return 'emergency stop latched'
        if self._faults:
            return 'faults latched: ' + ', '.join(self._faults)
        if not self._enabled:
            return 'axes disabled (call enable())'
        if self._inhibited:
            return 'motion inhibited'
        return 'ready'

    def _begin_stop(self) -> None:
        if self._mode != 'hold':
            self._mode = 'stopping'

    def stop(self) -> None:
        """Controlled stop: decelerate at the axis acceleration limits, then hold."""
        with self._lock:
            self._require_connected('stop')
            self._sync()
            self._begin_stop()

    def emergency_stop(self) -> None:
        """Hold the current position at once, disable, and latch until reset_faults()."""
        with self._lock:
            self._require_connected('emergency stop')
            self._sync()
            self._estopped = True
            self._enabled = False
            self._hold_here()

    def set_motion_inhibit(self, inhibit: bool) -> None:
        """Inhibit: decelerate to a stop and hold, refusing setpoints until cleared."""
        with self._lock:
            self._require_connected('set motion inhibit')
            self._sync()
            self._inhibited = bool(inhibit)
            if self._inhibited:
                self._begin_stop()

    def reset_faults(self) -> None:
        """Clear latched faults and the e-stop; the axes stay disabled until enable()."""
        with self._lock:
            self._require_connected('reset faults')
            self._sync()
            self._faults = []
            self._estopped = False

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
