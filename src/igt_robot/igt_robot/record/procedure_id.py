"""The procedure id every process of one procedure shares (events and doses carry it).

The launcher (``igt_robot.demo``, the launch files) sets ``IGT_PROCEDURE_ID`` for every process of the
stack; the recorder keeps only events and doses of its own procedure (docs/record.md, "One procedure,
one record"). Unset: the nodes publish an empty id, which the recorder accepts as "not labelled".
"""
from __future__ import annotations

import os
import re

ENV_VAR = 'IGT_PROCEDURE_ID'
_ID_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$')


def valid(procedure_id: str) -> bool:
    return bool(_ID_RE.match(procedure_id or ''))


def current() -> str:
    """This process's procedure id ('' when none was given or it is malformed)."""
    value = os.environ.get(ENV_VAR, '').strip()
    return value if valid(value) else ''


def set_current(procedure_id: str) -> None:
    """Make ``procedure_id`` this process's (and its children's) procedure id."""
    if not valid(procedure_id):
        raise ValueError(f'procedure id {procedure_id!r}: use 1-64 characters of [A-Za-z0-9_.-]')
    os.environ[ENV_VAR] = procedure_id
