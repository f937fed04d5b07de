"""OpenIGTLink TCP server with a defensive receive path, built on pyigtl.

pyigtl provides the message codecs (pack/unpack) and the thread-safe outgoing
queue (:class:`pyigtl.comm.OpenIGTLinkBase`). Its ``OpenIGTLinkServer`` is not
used as-is because, for a robot, it:

* replaces the process's SIGINT/SIGTERM handlers (and fails off the main thread),
* binds either 127.0.0.1 or the address of ``eth0``, nothing else,
* reads a whole message body into memory before knowing whether to accept it,
* loses a partially received header when the socket times out, and
* spins forever on a closed connection instead of accepting the next client.

This server keeps a persistent receive buffer, checks the header's body size
against a limit *before* buffering (an oversized body is drained and discarded
so the stream stays in sync and the connection survives), verifies the CRC-64,
and reports every refused message to the bridge, which answers with a STATUS.
Only a broken *framing* (unreadable header, stalled body) closes the connection,
because after that no later byte can be trusted. One client at a time.
"""
from __future__ import annotations

import logging
import select
import socket
import socketserver
import struct
import threading
import time
from typing import Callable, Iterable, List, Optional

from pyigtl import comm as _pyigtl_comm
from pyigtl import messages as _pyigtl_messages

from .messages import StatusCode, register_status_message

register_status_message()

_log = logging.getLogger(__name__)

HEADER = struct.Struct('> H 12s 20s I I Q Q')
HEADER_SIZE = HEADER.size  # 58
POLL_S = 0.02              # receive poll period; also bounds the latency of outgoing messages
SEND_TIMEOUT_S = 5.0
_DRAIN_CHUNK = 1 << 20


def _clean_ascii(raw: bytes) -> Optional[str]:
    """Header name field -> text; None when it is not printable ASCII (framing lost)."""
    raw = raw.split(b'\0', 1)[0]
    try:
        text = raw.decode('ascii')
    except UnicodeDecodeError:
        return None
    if any(not (32 <= ord(c) < 127) for c in text):
        return None
    return text.strip()


class FramingError(Exception):
    """The byte stream no longer follows OpenIGTLink framing; the connection must close."""


class StreamReader:
    """Incremental OpenIGTLink framing: feed bytes, get complete messages or refusals.

    ``limit_for(message_type) -> int`` gives the largest accepted body (bytes).
    Yields tuples ``('message', header_fields, body)`` or
    ``('refused', device_name, message_type, StatusCode, reason)``.
    """

    def __init__(self, limit_for: Callable[[str], int]):
        self._limit_for = limit_for
        self._buf = bytearray()
        self._header = None          # parsed header of the message in progress
        self._drain_left = 0         # bytes of an oversized body still to discard
        self.last_progress = time.monotonic()

    @property
    def mid_message(self) -> bool:
        return bool(self._buf) or self._header is not None or self._drain_left > 0

    def feed(self, data: bytes) -> List[tuple]:
        out: List[tuple] = []
        if data:
            self.last_progress = time.monotonic()
        view = memoryview(data)
        while True:
            if self._drain_left:
                take = min(self._drain_left, len(view))
                self._drain_left -= take
                view = view[take:]
                if self._drain_left:
                    return out
                continue
            if self._header is None:
                need = HEADER_SIZE - len(self._buf)
                self._buf += view[:need]
                view = view[need:]
                if len(self._buf) < HEADER_SIZE:
                    return out
                self._header = self._parse_header(bytes(self._buf))
                self._buf.clear()
                fields = self._header
                limit = self._limit_for(fields['message_type'])
                if fields['body_size'] > limit:
                    out.append(('refused', fields['device_name'], fields['message_type'], StatusCode.OVERFLOW,
                                f'{fields["message_type"]} body of {fields["body_size"]} bytes exceeds the '
                                f'limit of {limit} bytes; discarded'))
                    self._drain_left = fields['body_size']
                    self._header = None
                    continue
            fields = self._header
            need = fields['body_size'] - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) < fields['body_size']:
                return out
            body = bytes(self._buf)
            self._buf.clear()
            self._header = None
            crc = _pyigtl_messages.CRC64(body)
            if crc != fields['crc']:
                out.append(('refused', fields['device_name'], fields['message_type'], StatusCode.CHECKSUM_ERROR,
                            f'CRC-64 mismatch (header {fields["crc"]:016x}, body {crc:016x}); message discarded'))
            else:
                out.append(('message', fields, body))

    @staticmethod
    def _parse_header(raw: bytes) -> dict:
        version, mtype, device, sec, frac, body_size, crc = HEADER.unpack(raw)
        message_type = _clean_ascii(mtype)
        device_name = _clean_ascii(device)
        if version not in (1, 2, 3) or not message_type or device_name is None:
            raise FramingError(f'unreadable OpenIGTLink header (version {version}, type {mtype!r})')
        if body_size >= 1 << 40:  # no sane sender; more likely garbage than a real size
            raise FramingError(f'header announces an absurd body size ({body_size} bytes)')
        return {'header_version': version, 'message_type': message_type, 'device_name': device_name,
                'timestamp': sec + frac / 4294967296.0,  # 32-bit binary fraction of a second
                'body_size': body_size, 'crc': crc}


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        self.server._serve_connection(self.request, self.client_address)


class IgtlServer(socketserver.TCPServer, _pyigtl_comm.OpenIGTLinkBase):
    """One-client OpenIGTLink server. Callbacks run on the server thread.

    ``on_message(msg) -> iterable of replies`` gets decoded pyigtl messages;
    ``on_refused(device, type, code, reason) -> iterable of replies`` gets
    messages rejected before decoding (too large, bad CRC, unknown type,
    undecodable body). Replies are queued and sent on the same connection.
    """

    allow_reuse_address = True

    def __init__(self, host: str, port: int, *, on_message, on_refused, limit_for: Callable[[str], int],
                 body_timeout_s: float = 5.0, on_connection: Optional[Callable[[bool, tuple], None]] = None):
        _pyigtl_comm.OpenIGTLinkBase.__init__(self, body_receive_timeout_sec=body_timeout_s)
        self._on_message = on_message
        self._on_refused = on_refused
        self._on_connection = on_connection
        self._limit_for = limit_for
        self.address_family = socket.AF_INET6 if ':' in host else socket.AF_INET
        socketserver.TCPServer.__init__(self, (host, port), _Handler)
        self.host, self.port = self.server_address[0], self.server_address[1]
        self._thread: Optional[threading.Thread] = None
        self.peer = None

    # -------------------------------------------------------------- lifetime
    def start(self) -> None:
        if self._thread is not None:
            return
        self._started = True
        self.communication_thread_stop_requested = False
        self._thread = threading.Thread(target=self.serve_forever, kwargs={'poll_interval': 0.05},
                                        name=f'igtl-server-{self.port}', daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the client connection and the listening socket; idempotent."""
        self.communication_thread_stop_requested = True
        if self._thread is not None:
            self.shutdown()  # returns once serve_forever (and the connection handler) has ended
            self._thread.join(timeout)
            self._thread = None
        self.server_close()
        self._connected = False
        self._started = False

    # -------------------------------------------------------------- sending
    def send(self, message) -> bool:
        """Queue a message for the connected client; False (not queued) when nobody is connected."""
        if not self._connected:
            return False
        return self._add_message_to_send_queue(message, wait=False)

    def _queue_replies(self, replies: Optional[Iterable]) -> None:
        for reply in replies or ():
            self._add_message_to_send_queue(reply, wait=False)

    # -------------------------------------------------------------- receiving
    def _serve_connection(self, sock: socket.socket, address) -> None:
        # Replies queued for a previous client are stale for this one.
        with self.lock_outgoing_messages:
            self.outgoing_messages.clear()
        sock.settimeout(SEND_TIMEOUT_S)
        reader = StreamReader(self._limit_for)
        self.peer = address
        self._connected = True
        self._notify_connection(True, address)
        try:
            while not self.communication_thread_stop_requested:
                readable, _, _ = select.select([sock], [], [], POLL_S)
                if readable:
                    data = sock.recv(1 << 16)
                    if not data:
                        break  # orderly close by the client
                    for item in reader.feed(data):
                        self._deliver(item)
                elif reader.mid_message and time.monotonic() - reader.last_progress > self.body_receive_timeout_sec:
                    raise FramingError(f'message incomplete for {self.body_receive_timeout_sec:.1f} s')
                self._send_all_queued(sock)
        except FramingError as exc:
            _log.warning('OpenIGTLink connection from %s closed: %s', address, exc)
        except OSError as exc:
            _log.warning('OpenIGTLink connection from %s lost: %s', address, exc)
        finally:
            self._connected = False
            self.peer = None
            self._notify_connection(False, address)

    def _send_all_queued(self, sock: socket.socket) -> None:
        while True:
            try:
                if not self._send_queued_message_from_socket(sock):
                    return
            except OSError:
                raise
            except Exception:  # pack() failed: pyigtl already dequeued it, so it is dropped alone
                _log.exception('dropping an outgoing OpenIGTLink message that cannot be packed')

    def _deliver(self, item: tuple) -> None:
        if item[0] == 'refused':
            _, device, mtype, code, reason = item
            self._queue_replies(self._safe(self._on_refused, device, mtype, code, reason))
            return
        _, fields, body = item
        message = _pyigtl_messages.MessageBase.create_message(fields['message_type'])
        if message is None:
            self._queue_replies(self._safe(self._on_refused, fields['device_name'], fields['message_type'],
                                           StatusCode.ILLEGAL_INSTRUCTION,
                                           f'message type {fields["message_type"]} is not supported'))
            return
        try:
            message.unpack(fields, body)
        except Exception as exc:  # pyigtl raises struct.error, ValueError, KeyError, ...
            self._queue_replies(self._safe(self._on_refused, fields['device_name'], fields['message_type'],
                                           StatusCode.INVALID,
                                           f'malformed {fields["message_type"]} body: {type(exc).__name__}: {exc}'))
            return
        self._queue_replies(self._safe(self._on_message, message))

    def _safe(self, fn, *args):
        try:
            return fn(*args)
        except Exception:  # a bug in a callback must not take the link down
            _log.exception('OpenIGTLink callback failed')
            return ()

    def _notify_connection(self, connected: bool, address) -> None:
        if self._on_connection is not None:
            self._safe(self._on_connection, connected, address)
