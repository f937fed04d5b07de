"""Process-wide interpreter settings of igt_robot.nodes.spinning."""
import sys

import pytest

from igt_robot.nodes import spinning


@pytest.fixture
def switch_interval():
    """Restores the process's interpreter-lock switch interval after the test."""
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_the_switch_interval_is_shortened_from_the_default(switch_interval):
    sys.setswitchinterval(0.005)                    # CPython's default
    spinning.shorten_gil_switch_interval()
    assert sys.getswitchinterval() == pytest.approx(spinning.GIL_SWITCH_INTERVAL_S, abs=2e-6)


def test_a_shorter_switch_interval_chosen_by_the_process_is_kept(switch_interval):
    sys.setswitchinterval(0.0002)
    spinning.shorten_gil_switch_interval()
    assert sys.getswitchinterval() == pytest.approx(0.0002, abs=2e-6)
