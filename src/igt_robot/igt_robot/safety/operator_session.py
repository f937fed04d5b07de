"""The operator's session secret: who may resume, acknowledge, release an e-stop or override the scanner.

At start-up the stack issues a random secret into a file readable only by the
operator's user (mode 0600, in a folder of mode 0700). The operator console and
the Slicer bridge read it and send it with every operator-only request; the
safety supervisor and the procedure node check it. A process of another user on
the same ROS graph cannot read the file, so it cannot resume motion or release
an e-stop, whatever it publishes or calls. Pressing an e-stop never needs it.

No rclpy here: this is core code.
"""
from __future__ import annotations

import hmac
import os
import pathlib
import secrets
import stat
from typing import Optional, Tuple


class OperatorSessionError(RuntimeError):
    """The session file is missing, unreadable or not private; the message says which."""


def default_session_path() -> pathlib.Path:
    """Per-user runtime folder ($XDG_RUNTIME_DIR, else /tmp/igt_robot-<uid>)/igt_robot/operator_session-d<N>,
    N = $ROS_DOMAIN_ID (0 if unset): two stacks of one user on separate ROS domains have separate sessions."""
    base = os.environ.get('XDG_RUNTIME_DIR') or f'/tmp/igt_robot-{os.getuid()}'
    domain = os.environ.get('ROS_DOMAIN_ID', '').strip() or '0'
    return pathlib.Path(base) / 'igt_robot' / f'operator_session-d{domain}'


def issue_session(path: Optional[os.PathLike] = None) -> str:
    """Create a fresh secret, write it atomically to ``path`` (0600 in a 0700 folder) and return it."""
    path = pathlib.Path(path) if path else default_session_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, token.encode('ascii'))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return token


def read_session(path: Optional[os.PathLike] = None) -> str:
    """The secret in ``path``; refuses a file that others could read or write."""
    path = pathlib.Path(path) if path else default_session_path()
    try:
        info = path.stat()
        token = path.read_text(encoding='ascii').strip()
    except OSError as exc:
        raise OperatorSessionError(f'operator session file {path} cannot be read: {exc.strerror or exc}') from exc
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise OperatorSessionError(f'operator session file {path} is readable by others '
                                   f'(mode {stat.S_IMODE(info.st_mode):o}); expected 600')
    if not token:
        raise OperatorSessionError(f'operator session file {path} is empty')
    return token


def check_token(expected: str, given: str) -> Tuple[bool, str]:
    """(accepted, reason) for an operator-only request carrying ``given``; constant-time compare."""
    if not expected:
        return False, 'no operator session issued'
    if not given:
        return False, 'operator session secret missing (use igt-operator or the Slicer bridge)'
    if not hmac.compare_digest(expected.encode(), given.encode()):
        return False, 'operator session secret does not match'
    return True, ''
