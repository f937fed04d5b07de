"""The ament linters with the project's style, for each package's test/test_flake8.py and test_pep257.py.

The style lives in the package's setup.cfg: ``[flake8]`` (line length, ignores) is handed to
ament_flake8 as its config file; ``[pep257]`` ``add-ignore`` extends ament_pep257's ament convention
(the project writes Google-style sections, summaries that are phrases, not commands).
"""
from __future__ import annotations

import configparser
import contextlib
import io
import os
import pathlib
from typing import List, Tuple


def _in_package(package_dir: pathlib.Path):
    # The linters report paths relative to the working directory; colcon runs tests in the package.
    return contextlib.chdir(package_dir)


def flake8_errors(package_dir: os.PathLike) -> Tuple[int, List[str]]:
    """(exit code, violations) of ament_flake8 on ``package_dir`` with its setup.cfg [flake8]."""
    from ament_flake8.main import main_with_errors
    package_dir = pathlib.Path(package_dir)
    with _in_package(package_dir):   # flake8 writes to sys.stdout.buffer: pytest captures it
        return main_with_errors(argv=['--config', 'setup.cfg', '.'])


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
