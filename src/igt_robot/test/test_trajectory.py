"""Trajectory generation: limits, exact endpoints, synchronisation, validation."""
import math

import numpy as np
import pytest

from igt_robot.trajectory import (JointLimits, MultiSegmentTrajectory, PROFILES, TrajectoryError,
                                  plan_point_to_point, plan_waypoints)

NAMES = ('stage_x', 'stage_y', 'guide_pitch', 'guide_yaw', 'needle_insertion')
# The robot's limits from docs/contracts.md (velocity from the URDF, acceleration from config).
VEL = np.array([0.010, 0.010, 0.20, 0.20, 0.005])
ACC = np.array([0.02, 0.02, 0.5, 0.5, 0.01])
JERK = np.array([0.1, 0.1, 2.5, 2.5, 0.05])
LOWER = np.array([-0.04, -0.04, -0.5236, -0.5236, 0.0])
UPPER = np.array([0.04, 0.04, 0.5236, 0.5236, 0.150])
REL = 1e-9   # floating-point slack on limit checks


def limits(jerk=True):
    return JointLimits(velocity=VEL, acceleration=ACC, jerk=JERK if jerk else None,
                       lower=LOWER, upper=UPPER, joint_names=NAMES)


def random_pose(rng):
    return rng.uniform(LOWER, UPPER)


def dense(traj, n=20001):
    t = np.linspace(-0.1, traj.duration + 0.1, n)
    return (t,) + traj.sample_many(t)


@pytest.mark.parametrize('profile', PROFILES)
def test_limits_never_exceeded_and_endpoints_exact(profile):
    rng = np.random.default_rng(1)
    lim = limits()
    for _ in range(20):
        q0, q1 = random_pose(rng), random_pose(rng)
        traj = plan_point_to_point(q0, q1, lim, profile)
        t, q, qd, qdd = dense(traj)
        assert np.all(np.abs(qd) <= VEL * (1 + REL))
        assert np.all(np.abs(qdd) <= ACC * (1 + REL))
        assert np.all(q >= np.minimum(q0, q1) - 1e-12) and np.all(q <= np.maximum(q0, q1) + 1e-12)
        end = traj.sample(traj.duration)
        assert np.array_equal(end.positions, q1)            # exact, not approximately
        assert np.array_equal(traj.sample(0.0).positions, q0)
        assert np.all(end.velocities == 0) and np.all(end.accelerations == 0)
        later = traj.sample(traj.duration + 5.0)            # holds afterwards
        assert np.array_equal(later.positions, q1) and np.all(later.velocities == 0)
        # The pace-setting joint uses its full velocity or acceleration (no needless slowness).
        usage = np.maximum(np.max(np.abs(qd), axis=0) / VEL, np.max(np.abs(qdd), axis=0) / ACC)
        assert usage.max() > 0.99


@pytest.mark.parametrize('profile', PROFILES)
def test_joints_are_synchronised(profile):
    q0 = np.array([0.0, 0.0, 0.0, 0.0, 0.0])
    q1 = np.array([0.03, -0.001, 0.1, -0.4, 0.02])
    traj = plan_point_to_point(q0, q1, limits(), profile)
    t, q, qd, _ = dense(traj)
    progress = (q - q0) / (q1 - q0)
    # Every joint is at the same fraction of its move at every instant (straight line).
    assert np.allclose(progress, progress[:, :1], atol=1e-12)
    inside = (t > 1e-3) & (t < traj.duration - 1e-3)
    assert np.all(np.abs(qd[inside]) > 0)                   # all move the whole time ...
    assert np.all(qd[t <= 0] == 0) and np.all(qd[t >= traj.duration] == 0)   # ... and start/stop together


def test_trapezoid_durations_match_closed_form():
    lim = limits()
    # Long stage move: cruise phase. T = D/v + v/a.
    traj = plan_point_to_point(np.zeros(5), [0.03, 0, 0, 0, 0], lim)
    assert traj.duration == pytest.approx(0.03 / 0.01 + 0.01 / 0.02, rel=1e-12)
    # Short move: triangular velocity. T = 2 sqrt(D/a).
    traj = plan_point_to_point(np.zeros(5), [1e-4, 0, 0, 0, 0], lim)
    assert traj.duration == pytest.approx(2 * math.sqrt(1e-4 / 0.02), rel=1e-12)
    # The slow insertion joint sets the pace when combined with a fast pitch move.
    traj = plan_point_to_point(np.zeros(5), [0, 0, 0.1, 0, 0.05], lim)
    assert traj.duration == pytest.approx(0.05 / 0.005 + 0.005 / 0.01, rel=1e-12)


def test_scurve_respects_jerk_and_matches_closed_form():
    lim = limits()
    traj = plan_point_to_point(np.zeros(5), [0.03, 0, 0, 0, 0], lim, 'scurve')
    # V, A and J all reached: T = L/V + V/A + A/J.
    assert traj.duration == pytest.approx(0.03 / 0.01 + 0.01 / 0.02 + 0.02 / 0.1, rel=1e-12)
    rng = np.random.default_rng(7)
    for _ in range(10):
        q0, q1 = random_pose(rng), random_pose(rng)
        tr = plan_point_to_point(q0, q1, lim, 'scurve')
        t = np.linspace(0, tr.duration, 40001)
        _, _, qdd = tr.sample_many(t)
        jerk = np.diff(qdd, axis=0) / np.diff(t)[:, None]
        assert np.all(np.abs(jerk) <= JERK * (1 + 1e-6))   # acceleration continuous and jerk-limited
        assert tr.duration >= plan_point_to_point(q0, q1, lim, 'trapezoidal').duration
    # Short moves where neither V nor A is reached still land exactly.
    for d in (1e-6, 1e-4, 3e-3):
        tr = plan_point_to_point(np.zeros(5), [d, 0, 0, 0, 0], lim, 'scurve')
        _, q, qd, qdd = dense(tr)
        assert np.all(np.abs(qd) <= VEL * (1 + REL)) and np.all(np.abs(qdd) <= ACC * (1 + REL))
        mid = tr._profile.evaluate(tr.duration * (1 - 1e-12))[0]
        assert mid == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize('profile', PROFILES)
def test_continuity(profile):
    q0, q1 = np.array([-0.03, 0.02, 0.3, -0.2, 0.0]), np.array([0.02, -0.03, -0.4, 0.3, 0.1])
    traj = plan_point_to_point(q0, q1, limits(), profile)
    t = np.linspace(0, traj.duration, 100001)
    dt = t[1] - t[0]
    q, qd, qdd = traj.sample_many(t)
    assert np.all(np.abs(np.diff(q, axis=0)) <= VEL * dt * (1 + 1e-6))
    assert np.all(np.abs(np.diff(qd, axis=0)) <= ACC * dt * (1 + 1e-6))
    # Positions integrate the velocities (trapezoid rule), i.e. sample() is self-consistent.
    integrated = q0 + np.concatenate([np.zeros((1, 5)), np.cumsum((qd[1:] + qd[:-1]) / 2 * dt, axis=0)])
    assert np.allclose(integrated, q, atol=1e-7)


def test_sample_matches_sample_many():
    traj = plan_point_to_point(np.zeros(5), [0.01, 0.02, 0.1, 0.1, 0.01], limits(), 'scurve')
    for tt in np.linspace(-1, traj.duration + 1, 37):
        s = traj.sample(tt)
        q, qd, qdd = traj.sample_many([tt])
        assert np.allclose(s.positions, q[0], atol=1e-15) and np.allclose(s.velocities, qd[0], atol=1e-15)
        assert np.allclose(s.accelerations, qdd[0], atol=1e-15)


def test_multi_waypoint_rest_at_each_waypoint():
    lim = limits()
    start = np.zeros(5)
    wps = [[0.01, 0, 0, 0, 0], [0.01, 0, 0, 0, 0], [0.01, 0.01, 0.2, 0, 0], [0, 0, 0, 0, 0.02]]
    traj = plan_waypoints(start, wps, lim)
    assert isinstance(traj, MultiSegmentTrajectory)
    assert len(traj.segments) == 3                           # the repeated waypoint is skipped
    assert traj.duration == pytest.approx(sum(s.duration for s in traj.segments))
    boundaries = np.cumsum([s.duration for s in traj.segments])
    expected = [wps[0], wps[2], wps[3]]
    for tb, wp in zip(boundaries, expected):
        s = traj.sample(tb)
        assert np.allclose(s.positions, wp, atol=1e-15)
        assert np.all(s.velocities == 0)
    t, q, qd, qdd = dense(traj, 50001)
    assert np.all(np.abs(qd) <= VEL * (1 + REL)) and np.all(np.abs(qdd) <= ACC * (1 + REL))
    assert np.array_equal(traj.sample(traj.duration + 1).positions, np.array(wps[-1], float))


def test_zero_length_move():
    q = np.array([0.01, 0.0, 0.1, 0.0, 0.0])
    traj = plan_point_to_point(q, q, limits())
    assert traj.duration == 0.0
    assert np.array_equal(traj.sample(0.3).positions, q)


def test_start_slightly_outside_limits_moves_back_inside():
    q0 = UPPER + np.array([1e-5, 0, 0, 0, 0])
    traj = plan_point_to_point(q0, np.zeros(5), limits())
    t, q, _, _ = dense(traj)
    assert np.all(np.diff(q[:, 0]) <= 0)                     # monotonic back inside


def test_validation_errors_name_the_problem():
    lim = limits()
    with pytest.raises(TrajectoryError, match='goal.*guide_pitch'):
        plan_point_to_point(np.zeros(5), [0, 0, float('nan'), 0, 0], lim)
    with pytest.raises(TrajectoryError, match='needle_insertion.*outside its limits'):
        plan_point_to_point(np.zeros(5), [0, 0, 0, 0, 0.2], lim)
    with pytest.raises(TrajectoryError, match='waypoint 1.*stage_x'):
        plan_waypoints(np.zeros(5), [[0] * 5, [0.5, 0, 0, 0, 0]], lim)
    with pytest.raises(TrajectoryError, match='expected 5'):
        plan_point_to_point(np.zeros(4), np.zeros(5), lim)
    with pytest.raises(TrajectoryError, match='unknown profile'):
        plan_point_to_point(np.zeros(5), np.zeros(5), lim, 'cubic')
    with pytest.raises(TrajectoryError, match='jerk'):
        plan_point_to_point(np.zeros(5), np.ones(5) * 0.01, limits(jerk=False), 'scurve')
    with pytest.raises(TrajectoryError, match='speed_scale'):
        plan_point_to_point(np.zeros(5), np.zeros(5), lim, speed_scale=0.0)
    with pytest.raises(TrajectoryError, match=r'acceleration limit\[guide_yaw\]'):
        JointLimits(velocity=VEL, acceleration=[0.02, 0.02, 0.5, -1, 0.01], joint_names=NAMES)
    with pytest.raises(TrajectoryError, match='lower .* >= upper'):
        JointLimits(velocity=[1], acceleration=[1], lower=[1], upper=[0])


def test_speed_scale_slows_down():
    lim = limits()
    fast = plan_point_to_point(np.zeros(5), [0.03, 0, 0, 0, 0], lim)
    slow = plan_point_to_point(np.zeros(5), [0.03, 0, 0, 0, 0], lim, speed_scale=0.5)
    _, _, qd, _ = dense(slow)
    assert slow.duration > fast.duration
    assert np.max(np.abs(qd[:, 0])) == pytest.approx(0.005, rel=1e-9)
