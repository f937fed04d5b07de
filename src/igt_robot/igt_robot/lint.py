"""The ament linters with the project's style, for each package's test/test_flake8.py and test_pep257.py.

The style lives in the package's setup.cfg: ``[flake8]`` (line length, ignores) is handed to
ament_flake8 as its config file; ``[pep257]`` ``add-ignore`` extends ament_pep257's ament convention
(the project writes Google-style sections, summaries that are phrases, not commands).
"""
from __future__ import annotations

import configparser
import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
from typing import List, Tuple


def _in_package(package_dir: pathlib.Path):
    # The linters report paths relative to the working directory; colcon runs tests in the package.
    return contextlib.chdir(package_dir)


_FLAKE8_CHILD = (
    'import json, sys\n'
    'from ament_flake8.main import main_with_errors\n'
    'rc, errors = main_with_errors(argv=["--config", "setup.cfg", "."])\n'
    'sys.stderr.write(json.dumps([rc, [str(e) for e in errors]]))\n')


def flake8_errors(package_dir: os.PathLike) -> Tuple[int, List[str]]:
    """(exit code, violations) of ament_flake8 on ``package_dir`` with its setup.cfg [flake8].

    Runs in a fresh interpreter: flake8 checks files in a forked multiprocessing pool, and forking a
    test process that already runs rclpy threads crashes the children (seen: segfaults, then a hang).
    """
    package_dir = pathlib.Path(package_dir)
    child = subprocess.run([sys.executable, '-c', _FLAKE8_CHILD], cwd=package_dir, capture_output=True,
                           text=True, timeout=600)
    try:
        rc, errors = json.loads(child.stderr.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return child.returncode or 1, [f'ament_flake8 did not report (exit {child.returncode}): '
                                       f'{child.stderr[-2000:]}']
    return rc, errors


def pep257_errors(package_dir: os.PathLike) -> Tuple[int, str]:
    """(exit code, report) of ament_pep257 on ``package_dir`` with its setup.cfg [pep257] add-ignore."""
    from ament_pep257.main import main
    package_dir = pathlib.Path(package_dir)
    config = configparser.ConfigParser()
    config.read(package_dir / 'setup.cfg')
    ignore = config.get('pep257', 'add-ignore', fallback='').replace(',', ' ').split()
    out = io.StringIO()
    with _in_package(package_dir), contextlib.redirect_stdout(out):
        rc = main(argv=['--add-ignore', *ignore, '--', '.'] if ignore else ['.'])
    return rc, out.getvalue()
