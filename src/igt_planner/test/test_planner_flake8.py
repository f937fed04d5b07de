"""ament_flake8 on the igt_planner package, in the project's style (setup.cfg [flake8])."""
import pathlib

import pytest

from igt_robot.lint import flake8_errors

PACKAGE = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8():
    rc, errors = flake8_errors(PACKAGE)
    assert rc == 0, f'{len(errors)} flake8 violation(s) in igt_planner:\n' + '\n'.join(errors)
