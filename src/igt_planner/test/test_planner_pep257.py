"""ament_pep257 on the igt_planner package, in the project's style (setup.cfg [pep257])."""
import pathlib

import pytest

from igt_robot.lint import pep257_errors

PACKAGE = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.linter
@pytest.mark.pep257
def test_pep257():
    rc, report = pep257_errors(PACKAGE)
    assert rc == 0, f'docstring style violations in igt_planner:\n{report}'
