"""OpenIGTLink TCP server: many clients on one selector thread, each with its own limits.

pyigtl provides the content codecs; its ``OpenIGTLinkServer`` is not used
because it serves one client at a time on a thread that blocks on that client,
replaces the process's signal handlers, binds only 127.0.0.1 or ``eth0`` and
trusts every length field. This server runs one ``selectors`` loop on one
thread for all connections (the scanner bridge and 3D Slicer can be connected
at once, and no client can make the loop wait for it):

* **framing** (:class:`StreamReader`): a persistent receive buffer per client;
  the header's body size is checked against a limit *and* a shared in-flight
  byte budget before buffering (too large: drained and refused, the stream stays
  in sync); CRC-64 verified; a non-ASCII device name or an unknown header version
  is refused with a STATUS and the link stays. Only an unreadable header
  (non-ASCII type, absurd size) closes the connection: after that no byte can be
  trusted.
* **timeouts** (steady clock): a message must arrive whole within
  ``message_timeout_s`` of its first byte, so a client sending 1 byte/s is
  closed; a client that sends nothing keeps its slot only until the slots are
  full and it has been idle for ``idle_timeout_s`` (then the longest idle one is
  closed for the newcomer; clients that never sent a valid message go first);
  a client that does not read its replies is closed once ``max_send_buffer_bytes``
  are queued for it.
* **rate limit**: a token bucket per client (``rate_limit_hz``, ``rate_burst``);
  messages beyond it are dropped (reported as refusals without a reply, plus one
  STATUS ``BUSY`` per second), except those ``is_priority`` says must always pass
  (the bridge: EMERGENCY and STOP).
* **access**: an optional allow-list of client networks, checked at accept, and
  an optional shared secret: the first message must then be STRING ``AUTH``
  carrying it, within ``auth_timeout_s``; nothing is sent to a client before.
* **header versions**: replies and broadcasts go out with the header version the
  client last used (v2 with the extended header, a message id and the message's
  metadata plus ``in_reply_to``; v1 to v1 clients and to clients that have not
  spoken yet).

Callbacks run on the server thread and must return quickly. No rclpy here.
"""
from __future__ import annotations

import collections
import dataclasses
import hmac
import ipaddress
import itertools
import logging
import selectors
import socket
import threading
import time
from typing import Callable, Deque, Dict, Iterable, List, Optional, Tuple

from pyigtl import messages as _pyigtl_messages

from . import messages as codec
from .messages import HEADER, HEADER_SIZE, StatusCode, StatusMessage

_log = logging.getLogger(__name__)

POLL_S = 0.05               # loop wake-up period when nothing happens: bounds timeout detection latency
RECV_CHUNK = 1 << 16        # per client per loop turn: a client streaming an image cannot starve the others
CLOSE_GRACE_S = 1.0         # time given to flush a last STATUS before a connection is closed
BUSY_NOTICE_PERIOD_S = 1.0  # at most one STATUS BUSY per client per period while it is rate limited
# A large body gets extra time on top of message_timeout_s at this rate (a 64 MiB image over a 100 Mbit/s
# link takes ~5.4 s); a client announcing a large body still cannot hold its slot beyond that bound.
MIN_TRANSFER_BYTES_PER_S = 10e6
AUTH_DEVICE = 'AUTH'
MIB = 1 << 20


def _printable(raw: bytes) -> Tuple[str, bool]:
    """Header name field -> (text, is printable ASCII); non-printable bytes become '?'."""
    raw = raw.split(b'\0', 1)[0]
    ok = all(32 <= b < 127 for b in raw)
    return ''.join(chr(b) if 32 <= b < 127 else '?' for b in raw).strip(), ok


def _may_be_priority(fields: dict) -> bool:
    """Only a STRING command can be exempt from the rate limit; anything else is dropped undecoded."""
    return fields['message_type'] == 'STRING' and fields['device_name'].upper().startswith('CMD_')


class FramingError(Exception):
    """The byte stream no longer follows OpenIGTLink framing; the connection must close."""


class InboundBudget:
    """Bytes of message bodies being buffered across all clients (bounded memory); thread-confined."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.used = 0

    def acquire(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


class StreamReader:
    """Incremental OpenIGTLink framing: feed bytes, get complete messages or refusals.

    ``limit_for(message_type) -> int`` gives the largest accepted body (bytes).
    Yields ``('message', header_fields, body)`` or
    ``('refused', device_name, message_type, StatusCode, reason)``.
    ``message_started`` is the steady-clock time of the first byte of the message
    in progress (None between messages).
    """

    def __init__(self, limit_for: Callable[[str], int], budget: Optional[InboundBudget] = None,
                 clock: Callable[[], float] = time.monotonic):
        self._limit_for = limit_for
        self._budget = budget
        self._clock = clock
        self._buf = bytearray()
        self._header: Optional[dict] = None   # parsed header of the message in progress
        self._reserved = 0                    # bytes of the budget held for the body in progress
        self._drain_left = 0                  # bytes of a refused body still to discard
        self._drain_refusal: Optional[tuple] = None  # refusal reported once the drained body has passed
        self.message_started: Optional[float] = None
        self.expected_bytes = 0               # body size announced by the header in progress (0 before it)
        self.last_progress = clock()          # last byte received (for clients that watch silence)

    @property
    def mid_message(self) -> bool:
        return self.message_started is not None

    def close(self) -> None:
        """Give back the budget held for a body in progress (the connection is gone)."""
        if self._budget is not None and self._reserved:
            self._budget.release(self._reserved)
        self._reserved = 0

    def feed(self, data: bytes) -> List[tuple]:
        out: List[tuple] = []
        if data:
            self.last_progress = self._clock()
        view = memoryview(data)
        while view:
            if self.message_started is None:
                self.message_started = self._clock()
            if self._drain_left:
                take = min(self._drain_left, len(view))
                self._drain_left -= take
                view = view[take:]
                if not self._drain_left:
                    out.append(self._drain_refusal)
                    self._drain_refusal = None
                    self.message_started, self.expected_bytes = None, 0
                continue
            if self._header is None:
                need = HEADER_SIZE - len(self._buf)
                self._buf += view[:need]
                view = view[need:]
                if len(self._buf) < HEADER_SIZE:
                    break
                fields = self._parse_header(bytes(self._buf))
                self._buf.clear()
                self.expected_bytes = fields['body_size']
                refusal = self._admit(fields)
                if refusal is not None:
                    self._drain_left, self._drain_refusal = fields['body_size'], refusal
                    if not self._drain_left:
                        out.append(refusal)
                        self._drain_refusal = None
                        self.message_started, self.expected_bytes = None, 0
                    continue
                self._header = fields
            fields = self._header
            need = fields['body_size'] - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) < fields['body_size']:
                break
            out.append(self._finish(fields, bytes(self._buf)))
            self._buf.clear()
            self._header = None
            self.message_started, self.expected_bytes = None, 0
        return out

    def _admit(self, fields: dict) -> Optional[tuple]:
        """None to buffer the body, else the refusal reported once the body has been drained."""
        device, mtype, size = fields['device_name'], fields['message_type'], fields['body_size']
        if fields['header_version'] not in codec.SUPPORTED_HEADER_VERSIONS:
            return ('refused', device, mtype, StatusCode.UNKNOWN_VERSION,
                    f'header version {fields["header_version"]} is not supported (1 or 2); message discarded')
        limit = self._limit_for(mtype)
        if size > limit:
            return ('refused', device, mtype, StatusCode.OVERFLOW,
                    f'{mtype} body of {size} bytes exceeds the limit of {limit} bytes; discarded')
        if self._budget is not None and not self._budget.acquire(size):
            return ('refused', device, mtype, StatusCode.RESOURCE_ERROR,
                    f'{mtype} body of {size} bytes does not fit the receive budget now '
                    f'({self._budget.used} of {self._budget.limit} bytes in use); discarded, send it again')
        self._reserved = size if self._budget is not None else 0
        return None

    def _finish(self, fields: dict, body: bytes) -> tuple:
        if self._budget is not None and self._reserved:
            self._budget.release(self._reserved)
        self._reserved = 0
        if not fields['device_ascii']:
            return ('refused', fields['device_name'], fields['message_type'], StatusCode.INVALID,
                    f'device name {fields["raw_device"]!r} is not printable ASCII; message discarded')
        crc = _pyigtl_messages.CRC64(body)
        if crc != fields['crc']:
            return ('refused', fields['device_name'], fields['message_type'], StatusCode.CHECKSUM_ERROR,
                    f'CRC-64 mismatch (header {fields["crc"]:016x}, body {crc:016x}); message discarded')
        return ('message', fields, body)

    @staticmethod
    def _parse_header(raw: bytes) -> dict:
        version, mtype, device, sec, frac, body_size, crc = HEADER.unpack(raw)
        message_type, type_ok = _printable(mtype)
        device_name, device_ok = _printable(device)
        # A type that is not ASCII, or a version no implementation ever used, means we are not reading a
        # header: framing is lost. A bad device name is the sender's mistake in an intact header.
        if not type_ok or not message_type or not 1 <= version <= 15:
            raise FramingError(f'unreadable OpenIGTLink header (version {version}, type {mtype!r})')
        if body_size >= 1 << 40:
            raise FramingError(f'header announces an absurd body size ({body_size} bytes)')
        return {'header_version': version, 'message_type': message_type, 'device_name': device_name,
                'device_ascii': device_ok, 'raw_device': device.split(b'\0', 1)[0],
                'timestamp': sec + frac / 4294967296.0,  # 32-bit binary fraction of a second
                'body_size': body_size, 'crc': crc}


@dataclasses.dataclass
class ServerSettings:
    """Per-connection limits of :class:`IgtlServer` (times in s on the steady clock, sizes in bytes)."""

    max_clients: int = 64
    message_timeout_s: float = 5.0
    idle_timeout_s: float = 60.0     # <= 0: a silent client is never closed for a newcomer
    auth_timeout_s: float = 10.0
    rate_limit_hz: float = 500.0
    rate_burst: int = 1000
    max_send_buffer_bytes: int = 64 * MIB
    max_inbound_bytes: int = 256 * MIB
    allowed_clients: Tuple[str, ...] = ()
    shared_secret: str = ''

    def networks(self) -> List[ipaddress._BaseNetwork]:
        return [ipaddress.ip_network(a, strict=False) for a in self.allowed_clients]


class Client:
    """One connection. Read its public fields; the server thread alone changes them."""

    _ids = itertools.count(1)

    def __init__(self, sock: socket.socket, address, reader: StreamReader, settings: ServerSettings, now: float,
                 needs_auth: bool):
        self.id = next(Client._ids)
        self.sock = sock
        self.host, self.port = address[0], address[1]
        self.reader = reader
        self.connected_at = now
        self.last_message = now           # last complete message (valid or refused)
        self.proven = False               # has sent at least one valid message
        self.authenticated = not needs_auth
        self.header_version = 1           # what we send: the version the client last used
        self.out = bytearray()
        self.closing_since: Optional[float] = None
        self.closing_reason = ''
        self.tokens = float(settings.rate_burst)
        self.tokens_at = now
        self.dropped = 0
        self.busy_notice_at = -1e9

    @property
    def peer(self) -> str:
        return f'[{self.host}]:{self.port}' if ':' in self.host else f'{self.host}:{self.port}'

    def take_token(self, now: float, settings: ServerSettings) -> bool:
        self.tokens = min(float(settings.rate_burst), self.tokens + (now - self.tokens_at) * settings.rate_limit_hz)
        self.tokens_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class IgtlServer:
    """Multi-client OpenIGTLink server on one selector thread.

    Callbacks (all called on the server thread; exceptions are logged, never fatal):

    * ``on_message(message) -> iterable of replies`` for each decoded, admitted message;
    * ``on_refused(device, type, code, reason) -> iterable of replies`` for each message refused before
      it reached ``on_message`` (for a rate-limit drop, code BUSY, the replies are not sent);
    * ``on_connection(connected, (host, port), reason)`` for accepted connections (and authentication);
    * ``on_turned_away((host, port), reason)`` for connections closed at accept (allow-list, no free slot);
    * ``is_priority(message) -> bool``: exempt from the rate limit;
    * ``on_tick(now)``: every loop turn (at least every ``POLL_S``).

    During a callback, :attr:`current_client` is the :class:`Client` concerned (replies go to it).
    """

    def __init__(self, host: str, port: int, *, on_message, on_refused, limit_for: Callable[[str], int],
                 settings: Optional[ServerSettings] = None, on_connection=None, on_turned_away=None,
                 is_priority=None, on_tick=None, clock: Callable[[], float] = time.monotonic):
        self.settings = settings or ServerSettings()
        self._networks = self.settings.networks()
        self._on_message = on_message
        self._on_refused = on_refused
        self._on_connection = on_connection
        self._on_turned_away = on_turned_away
        self._is_priority = is_priority or (lambda message: False)
        self._on_tick = on_tick
        self._limit_for = limit_for
        self._clock = clock
        self._budget = InboundBudget(self.settings.max_inbound_bytes)
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
            self._listener.listen(64)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, 'listen')
        self._selector.register(self._wake_r, selectors.EVENT_READ, 'wake')
        self._clients: Dict[int, Client] = {}
        self._outbox: Deque[Tuple[object, Optional[int]]] = collections.deque()
        self._lock = threading.Lock()             # guards _outbox and the client snapshot
        self._eligible: Tuple[int, ...] = ()      # ids of authenticated clients (snapshot for other threads)
        self._info: Tuple[dict, ...] = ()         # clients() snapshot for other threads
        self._message_ids = itertools.count(1)
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.current_client: Optional[Client] = None

    # -------------------------------------------------------------- lifetime
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f'igtl-server-{self.port}', daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection and the listening socket; idempotent."""
        self._stop = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for client in list(self._clients.values()):
            self._drop(client, 'server stopped')
        for sock in (self._listener, self._wake_r, self._wake_w):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self._selector.close()

    # -------------------------------------------------------------- state for other threads
    @property
    def connected(self) -> bool:
        return bool(self._eligible)

    def client_ids(self) -> Tuple[int, ...]:
        return self._eligible

    def clients(self) -> List[dict]:
        """Snapshot of the connections (for diagnostics)."""
        with self._lock:
            return [dict(info) for info in self._info]

    # -------------------------------------------------------------- sending (any thread)
    def send(self, message, to: Optional[int] = None) -> bool:
        """Queue ``message`` for client ``to`` (None: every authenticated client).

        False (nothing queued) when no such client is connected: a late client never gets stale data.
        """
        with self._lock:
            if (to is None and not self._eligible) or (to is not None and to not in self._eligible):
                return False
            self._outbox.append((message, to))
        self._wake()
        return True

    def _wake(self) -> None:
        try:
            self._wake_w.send(b'\0')
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or shutting down

    # -------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while not self._stop:
            try:
                events = self._selector.select(POLL_S)
            except OSError:
                _log.exception('OpenIGTLink selector failed')
                time.sleep(POLL_S)
                continue
            for key, mask in events:
                if key.data == 'listen':
                    self._accept()
                elif key.data == 'wake':
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                else:
                    client = self._clients.get(key.data)
                    if client is None:
                        continue
                    if mask & selectors.EVENT_READ:
                        self._read(client)
                    if mask & selectors.EVENT_WRITE and client.id in self._clients:
                        self._flush(client)
            self._send_outbox()
            now = self._clock()
            self._check_timeouts(now)
            if self._on_tick is not None:
                self._safe(self._on_tick, now)

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                _log.warning('OpenIGTLink accept failed: %s', exc)
                return
            now = self._clock()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = StreamReader(self._limit_for, self._budget, self._clock)
            client = Client(sock, address, reader, self.settings, now, needs_auth=bool(self.settings.shared_secret))
            if self._networks and not self._allowed(client.host):
                sock.close()  # say nothing to a stranger
                self._turned_away(client, f'{client.host} is not in the allow-list')
                continue
            active = sum(1 for c in self._clients.values() if c.closing_since is None)
            if active >= self.settings.max_clients and not self._evict_idle(now):
                self._reject(client, StatusCode.BUSY, f'{active} clients connected (the limit); try again later')
                continue
            self._clients[client.id] = client
            self._selector.register(sock, selectors.EVENT_READ, client.id)
            self._snapshot()
            self._notify(True, client, 'connected')

    def _allowed(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split('%', 1)[0])
        except ValueError:
            return False
        if getattr(address, 'ipv4_mapped', None) is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self._networks)

    def _evict_idle(self, now: float) -> bool:
        """Close the longest-idle client idle beyond idle_timeout_s (unproven ones first); True if one went.

        ``idle_timeout_s`` <= 0: never (a server for one fixed peer keeps it however long it is silent)."""
        if self.settings.idle_timeout_s <= 0:
            return False
        idle = [c for c in self._clients.values()
                if c.closing_since is None and now - c.last_message > self.settings.idle_timeout_s]
        if not idle:
            return False
        victim = min(idle, key=lambda c: (c.proven, c.last_message))
        self._close(victim, StatusCode.TIME_OUT,
                    f'idle for {now - victim.last_message:.0f} s while all {self.settings.max_clients} client '
                    'slots are in use; closed for a new client')
        return True

    def _reject(self, client: Client, code: int, reason: str) -> None:
        try:
            client.sock.send(codec.encode(self._status('CONNECTION', code, reason)))
        except OSError:
            pass
        client.sock.close()
        self._turned_away(client, reason)

    def _turned_away(self, client: Client, reason: str) -> None:
        if self._on_turned_away is not None:
            self._safe(self._on_turned_away, (client.host, client.port), reason)

    def _read(self, client: Client) -> None:
        try:
            data = client.sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, f'lost: {exc}')
            return
        if not data:
            self._drop(client, 'closed by the client')
            return
        if client.closing_since is not None:
            return  # we are closing it: ignore what it still sends
        try:
            items = client.reader.feed(data)
        except FramingError as exc:
            self._close(client, StatusCode.INVALID, f'framing lost: {exc}')
            return
        for item in items:
            if client.id not in self._clients or client.closing_since is not None:
                return
            self._deliver(client, item)

    def _deliver(self, client: Client, item: tuple) -> None:
        now = self._clock()
        client.last_message = now
        if item[0] == 'refused':
            _, device, mtype, code, reason = item
            if not client.authenticated:
                self._close(client, StatusCode.ACCESS_DENIED, f'authenticate first (STRING {AUTH_DEVICE})')
                return
            if not client.take_token(now, self.settings):
                self._rate_limited(client, now, device, mtype)
                return
            self._reply(client, self._call(client, self._on_refused, device, mtype, code, reason), None)
            return
        _, fields, body = item
        has_token = client.authenticated and client.take_token(now, self.settings)
        if client.authenticated and not has_token and not _may_be_priority(fields):
            self._rate_limited(client, now, fields['device_name'], fields['message_type'])  # not even decoded
            return
        try:
            message = codec.decode(fields, body)
        except codec.BodyError as exc:
            message, code, reason = None, exc.code, exc.reason
        else:
            code, reason = StatusCode.ILLEGAL_INSTRUCTION, f'message type {fields["message_type"]} is not supported'
        if message is not None and client.header_version != fields['header_version']:
            client.header_version = fields['header_version']
            self._snapshot()
        if not client.authenticated:
            self._authenticate(client, message)
            return
        if not has_token and not (message is not None and self._safe_priority(message)):
            self._rate_limited(client, now, fields['device_name'], fields['message_type'])
            return
        if message is None:
            self._reply(client, self._call(client, self._on_refused, fields['device_name'], fields['message_type'],
                                           code, reason), None)
            return
        client.proven = True
        self._reply(client, self._call(client, self._on_message, message), message)

    def _authenticate(self, client: Client, message) -> None:
        secret = self.settings.shared_secret
        given = getattr(message, 'string', None) if message is not None else None
        if (message is None or message.message_type != 'STRING' or message.device_name != AUTH_DEVICE
                or not isinstance(given, str)):
            self._close(client, StatusCode.ACCESS_DENIED, f'authenticate first: STRING {AUTH_DEVICE} with the '
                                                          'shared secret')
            return
        if not hmac.compare_digest(given.encode('utf-8'), secret.encode('utf-8')):
            self._close(client, StatusCode.ACCESS_DENIED, 'wrong shared secret')
            return
        client.authenticated = True
        client.proven = True
        self._snapshot()
        self._reply(client, [self._status(AUTH_DEVICE, StatusCode.OK, 'authenticated')], message)
        self._notify(True, client, 'authenticated')

    def _rate_limited(self, client: Client, now: float, device: str, mtype: str) -> None:
        client.dropped += 1
        self._call(client, self._on_refused, device, mtype, StatusCode.BUSY,
                   f'rate limit of {self.settings.rate_limit_hz:g} messages/s exceeded; dropped')
        if now - client.busy_notice_at >= BUSY_NOTICE_PERIOD_S:
            client.busy_notice_at = now
            self._reply(client, [self._status('RATE_LIMIT', StatusCode.BUSY,
                                              f'rate limit of {self.settings.rate_limit_hz:g} messages/s '
                                              f'exceeded: {client.dropped} messages dropped so far')], None)

    def _safe_priority(self, message) -> bool:
        return bool(self._safe(self._is_priority, message))

    def _call(self, client: Client, fn, *args):
        self.current_client = client
        try:
            return self._safe(fn, *args)
        finally:
            self.current_client = None

    # -------------------------------------------------------------- writing
    def _status(self, device: str, code: int, text: str) -> StatusMessage:
        name = StatusCode(code).name if code in StatusCode._value2member_map_ else 'ERROR'
        return StatusMessage(code=code, error_name=name[:20], status_string=text, device_name=device,
                             timestamp=time.time())

    def _encode(self, client: Client, message, request=None, message_id: Optional[int] = None) -> Optional[bytes]:
        metadata = dict(getattr(message, 'metadata', None) or {})
        if request is not None and getattr(request, 'message_id', 0):
            metadata['in_reply_to'] = str(request.message_id)
        try:
            return codec.encode(message, client.header_version, metadata,
                                next(self._message_ids) if message_id is None else message_id)
        except Exception:  # a message that cannot be packed is dropped alone
            _log.exception('dropping an outgoing OpenIGTLink %s that cannot be packed',
                           getattr(message, 'message_type', '?'))
            return None

    def _reply(self, client: Client, replies: Optional[Iterable], request) -> None:
        for reply in replies or ():
            data = self._encode(client, reply, request)
            if data is not None:
                self._queue_bytes(client, data)

    def _send_outbox(self) -> None:
        while True:
            with self._lock:
                if not self._outbox:
                    return
                message, to = self._outbox.popleft()
            targets = [self._clients[to]] if to in self._clients else [] if to is not None else \
                [c for c in self._clients.values() if c.authenticated and c.closing_since is None]
            message_id = next(self._message_ids)
            cache: Dict[int, Optional[bytes]] = {}
            for client in targets:
                if client.header_version not in cache:
                    cache[client.header_version] = self._encode(client, message, message_id=message_id)
                if cache[client.header_version] is not None:
                    self._queue_bytes(client, cache[client.header_version])

    def _queue_bytes(self, client: Client, data: bytes) -> None:
        if client.id not in self._clients:
            return
        client.out += data
        if len(client.out) > self.settings.max_send_buffer_bytes:
            client.out.clear()
            self._drop(client, f'does not read: more than {self.settings.max_send_buffer_bytes} bytes queued')
            return
        self._flush(client)

    def _flush(self, client: Client) -> None:
        try:
            while client.out:
                sent = client.sock.send(client.out)
                del client.out[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._drop(client, f'lost: {exc}')
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
        try:
            self._selector.modify(client.sock, want, client.id)
        except (KeyError, ValueError):
            pass
        if client.closing_since is not None and not client.out:
            self._drop(client, client.closing_reason)

    # -------------------------------------------------------------- timeouts and closing
    def _check_timeouts(self, now: float) -> None:
        s = self.settings
        for client in list(self._clients.values()):
            if client.closing_since is not None:
                if now - client.closing_since > CLOSE_GRACE_S:
                    self._drop(client, client.closing_reason)
            elif client.reader.mid_message and now - client.reader.message_started > \
                    s.message_timeout_s + client.reader.expected_bytes / MIN_TRANSFER_BYTES_PER_S:
                allowed = s.message_timeout_s + client.reader.expected_bytes / MIN_TRANSFER_BYTES_PER_S
                self._close(client, StatusCode.TIME_OUT, f'a message took more than {allowed:.3g} s '
                                                         'to arrive (slow or stalled client)')
            elif not client.authenticated and now - client.connected_at > s.auth_timeout_s:
                self._close(client, StatusCode.TIME_OUT, f'not authenticated within {s.auth_timeout_s:g} s')

    def _close(self, client: Client, code: int, reason: str) -> None:
        """Send a last STATUS CONNECTION with the reason, then close (after at most CLOSE_GRACE_S)."""
        if client.closing_since is not None or client.id not in self._clients:
            return
        _log.warning('OpenIGTLink client %s closed: %s', client.peer, reason)
        data = self._encode(client, self._status('CONNECTION', code, reason))
        client.closing_since = self._clock()
        client.closing_reason = f'closed: {reason}'
        self._snapshot()
        if data is not None:
            client.out += data
        self._flush(client)

    def _drop(self, client: Client, reason: str) -> None:
        if self._clients.pop(client.id, None) is None:
            return
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        client.reader.close()
        self._snapshot()
        self._notify(False, client, reason)

    def _snapshot(self) -> None:
        with self._lock:
            self._eligible = tuple(c.id for c in self._clients.values()
                                   if c.authenticated and c.closing_since is None)
            self._info = tuple({'id': c.id, 'peer': c.peer, 'header_version': c.header_version,
                                'authenticated': c.authenticated, 'closing': c.closing_since is not None}
                               for c in self._clients.values())

    def _notify(self, connected: bool, client: Client, reason: str) -> None:
        if self._on_connection is not None:
            self._call(client, self._on_connection, connected, (client.host, client.port), reason)

    def _safe(self, fn, *args):
        try:
            return fn(*args)
        except Exception:  # a bug in a callback must not take the link down
            _log.exception('OpenIGTLink callback failed')
            return ()
