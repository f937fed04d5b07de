"""The controller's trigger port (docs/serial_protocol.md §9) on a pseudo-terminal.

The firmware emulator serves its trigger pty from its line thread; the MuJoCo backend, which models the
same controller inside the host process, serves one from a thread of :class:`TriggerPortPty`. Both write
replies with :func:`send_replies`.
"""
from __future__ import annotations

import contextlib
import errno
import os
import select
import threading
import tty
from typing import Callable, List, Optional

#: Replies kept for a relay that does not read them (bytes); older ones are dropped, as on a cable.
MAX_PENDING = 4096


def open_raw_pty():
    """(master fd, non-blocking; slave fd; slave path): a raw byte pipe like a UART (no echo, no line
    editing, no CR/LF translation)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


def read_pty(master: int) -> bytes:
    """What the host has sent on a controller pty (non-blocking); b'' when nothing has, or when no host has
    the port open (EIO). Any other failure is raised."""
    try:
        return os.read(master, 4096)
    except (BlockingIOError, InterruptedError):
        return b''
    except OSError as exc:
        if exc.errno == errno.EIO:
            return b''
        raise


def send_replies(master: int, pending: bytearray, replies: List[bytes]) -> None:
    """Append ``replies`` to ``pending`` and write what the pty takes now (non-blocking)."""
    pending += b''.join(replies)
    if not pending:
        return
    try:
        sent = os.write(master, bytes(pending))
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        sent = len(pending)                # nobody listening: the replies are lost, as on a cable
    del pending[:sent]
    if len(pending) > MAX_PENDING:
        del pending[:-MAX_PENDING]


class TriggerPortPty:
    """A pty whose bytes go to ``receive(data) -> reply frames`` (called from this class's thread; the
    callee takes whatever lock its controller model needs). ``link``: also a symlink to the pty, so a relay
    started with a fixed port name finds it (replaced if stale, removed on close)."""

    def __init__(self, receive: Callable[[bytes], List[bytes]], link: Optional[str] = None):
        self._receive = receive
        self.link = link or None
        self.master = self.slave = -1
        self.path = ''
        self._pending = bytearray()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def open(self) -> str:
        self.master, self.slave, self.path = open_raw_pty()
        if self.link:
            if os.path.islink(self.link):
                os.unlink(self.link)
            os.symlink(self.path, self.link)
        self._thread = threading.Thread(target=self._run, name='trigger-port', daemon=True)
        self._thread.start()
        return self.path

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.master], [], [], 0.1)
            except (OSError, ValueError):
                return                         # closed under us
            if not ready:
                continue
            try:
                data = read_pty(self.master)
            except OSError:
                return                         # the pty is gone
            if not data:                       # readable but empty: no relay has the port open
                self._stop.wait(0.05)
                continue
            send_replies(self.master, self._pending, self._receive(data))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(1.0)
        for fd in (self.master, self.slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.master = self.slave = -1
        if self.link and os.path.islink(self.link) and os.readlink(self.link) == self.path:
            with contextlib.suppress(OSError):
                os.unlink(self.link)
