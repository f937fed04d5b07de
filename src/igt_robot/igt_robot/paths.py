"""Where the package's data files are: the source tree first, then the ROS install.

During development (``make setup`` installs the packages editable) the files
come from the repository's ``urdf/``, ``config/`` and ``launch/``; after
``colcon build`` they come from ``<prefix>/share/igt_robot/``.
"""
from __future__ import annotations

import os
import pathlib
import sys

PACKAGE = 'igt_robot'
_DATA_DIRS = ('urdf', 'config', 'launch')


def _source_root():
    here = pathlib.Path(__file__).resolve()
    for parent in here.parents:
        if (parent / 'urdf').is_dir() and (parent / 'config').is_dir() and (parent / 'src').is_dir():
            return parent
    return None


def _share_roots():
    prefixes = [p for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p] + [sys.prefix]
    return [pathlib.Path(p) / 'share' / PACKAGE for p in prefixes]


def data_dir(kind: str) -> pathlib.Path:
    """The folder holding ``kind`` ('urdf', 'config' or 'launch')."""
    if kind not in _DATA_DIRS:
        raise ValueError(f'unknown data folder {kind!r}; expected one of {_DATA_DIRS}')
    candidates = []
    root = _source_root()
    if root is not None:
        candidates.append(root / kind)
    candidates += [share / kind for share in _share_roots()]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"igt_robot's {kind}/ folder not found (looked in: {', '.join(map(str, candidates))})")


def data_file(kind: str, name: str) -> pathlib.Path:
    path = data_dir(kind) / name
    if not path.is_file():
        raise FileNotFoundError(f'{path} does not exist')
    return path


def repo_root() -> pathlib.Path:
    """The source checkout (for tools that write build/ or records/); falls back to the working directory."""
    return _source_root() or pathlib.Path.cwd()


def record_dir(procedure_id: str, configured: str = '') -> pathlib.Path:
    """The record folder of a procedure: ``configured`` if set, else <repo>/build/records/<procedure_id>.

    The recorder and the procedure node both use this, so they agree on where the record is.
    """
    return pathlib.Path(configured or repo_root() / 'build' / 'records' / procedure_id).resolve()
