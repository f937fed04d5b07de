"""OpenIGTLink bridge core: 3D Slicer <-> robot, independent of ROS.

Wire conventions (docs/igtl_protocol.md has the full table):

* Coordinates on the wire are **RAS millimetres** (Slicer's world). Inside, and
  in every callback, they are **scanner LPS metres**, converted here with
  :func:`igt_robot.frames.ras_to_lps` and :mod:`igt_robot.units` only.
* Incoming: POINT/TRANSFORM ``TARGET`` and ``ENTRY``; TRANSFORM ``TGT_<id>``
  (BRP target) and ``CLB_<id>`` (BRP calibration: Z-frame pose); IMAGE (any
  name); STRING ``CMD_<id>`` commands; STATUS (passed on, never answered);
  GET_STATUS (answered with the real status from ``status_provider``).
* Commands (BRP robot protocol): START_UP, PLANNING, CALIBRATION, TARGETING,
  MOVE_TO_TARGET, STOP, EMERGENCY. Reply: STRING ``ACK_<id>`` echoing the text,
  then STATUS named after the command, code OK (1) or an error code with the
  reason from ``on_command``.
* Outgoing: TRANSFORM ``CURRENT_POSITION`` (needle pose), POINT ``PLAN`` (points
  ENTRY and TARGET), STATUS.
* Anything refused (unknown command/device/type, NaN or non-rigid matrix, too
  large, bad CRC, length fields that disagree, non-ASCII device name) gets a
  STATUS named after the offending device with a non-OK code and the reason;
  the connection and all bridge state (last target, entry, calibration) stay as
  they were. Refusals are recorded as ONE ``refused`` event per client per
  ``refusal_report_interval_s`` (count, codes, first examples), never one per
  message: a fuzzing client cannot flood the procedure record.
* Several clients at once (3D Slicer and a scanner bridge); the limits per
  client (timeouts, rate limit, allow-list, shared secret) are the server's,
  see :mod:`igt_robot.igtl.server`. A non-loopback bind needs both an
  allow-list and a shared secret (:class:`BridgeConfigError` otherwise).

Callbacks run on the server thread; keep them short (queue work, don't block).
"""
from __future__ import annotations

import collections
import dataclasses
import ipaddress
import logging
import math
import re
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from pyigtl import messages as _pm

from .. import frames, units
from .messages import DEVICE_NAME_BYTES, ERROR_NAME_BYTES, StatusCode, StatusMessage
from .server import IgtlServer, ServerSettings

_log = logging.getLogger(__name__)

BRP_COMMANDS: Tuple[str, ...] = ('START_UP', 'PLANNING', 'CALIBRATION', 'TARGETING', 'MOVE_TO_TARGET',
                                 'STOP', 'EMERGENCY')
# Commands that stop things: never rate limited, never waiting behind a flood.
PRIORITY_COMMANDS: Tuple[str, ...] = ('EMERGENCY', 'STOP')
MIB = 1 << 20
# Outgoing geometry says what it is, for clients that read header-v2 metadata.
GEOMETRY_METADATA = {'coordinate_system': 'RAS', 'length_unit': 'mm', 'sender': 'igt_robot'}

_ID_RE = re.compile(r'^[A-Za-z0-9_]{1,16}$')
_TEXT_RE = re.compile(r'^\s*([A-Za-z_]+)\s*(?:[:=]\s*|\s+|$)(.*?)\s*$', re.DOTALL)

CommandHandler = Callable[[str, str], Any]


class BridgeConfigError(ValueError):
    """Invalid bridge configuration; the message names the key."""


@dataclasses.dataclass
class BridgeConfig:
    """Bridge settings. Sizes in bytes, coordinates limit in mm (wire unit), times in s.

    host                  bind address; 127.0.0.1 unless a remote Slicer must connect (then
                          ``allowed_clients`` and ``shared_secret`` are both required).
    port                  TCP port (18944 is the OpenIGTLink default; 0 = pick a free one).
    max_image_bytes       largest IMAGE body accepted (larger ones are drained and refused).
    max_message_bytes     largest body of any other message type.
    max_coordinate_mm     |x|,|y|,|z| beyond this (RAS mm) is refused as implausible.
    rigid_tolerance       max |RᵀR - I| and |det R - 1| for calibration transforms.
    message_timeout_s     a message not complete this long after its first byte closes the connection.
    idle_timeout_s        a silent client may be closed for a newcomer when all slots are in use.
    auth_timeout_s        with a shared secret: time to send STRING AUTH after connecting.
    max_clients           connections served at once.
    rate_limit_hz, rate_burst   token bucket per client (EMERGENCY and STOP are exempt).
    max_send_buffer_bytes a client with more unread bytes queued is closed (it does not read).
    max_inbound_bytes     bodies being received, all clients together.
    allowed_clients       client addresses/networks allowed to connect (empty: any).
    shared_secret         if set, the first message must be STRING AUTH carrying it.
    refusal_report_interval_s   refusals of a client are recorded as one event per interval.
    commands              command names accepted in CMD_ messages.
    """

    host: str = '127.0.0.1'
    port: int = 18944
    max_image_bytes: int = 64 * MIB
    max_message_bytes: int = 1 * MIB
    max_coordinate_mm: float = 5000.0
    rigid_tolerance: float = 1e-3
    message_timeout_s: float = 5.0
    idle_timeout_s: float = 60.0
    auth_timeout_s: float = 10.0
    max_clients: int = 64
    rate_limit_hz: float = 500.0
    rate_burst: int = 1000
    max_send_buffer_bytes: int = 64 * MIB
    max_inbound_bytes: int = 256 * MIB
    allowed_clients: Tuple[str, ...] = ()
    shared_secret: str = dataclasses.field(default='', repr=False)
    refusal_report_interval_s: float = 5.0
    commands: Tuple[str, ...] = BRP_COMMANDS
    target_device: str = 'TARGET'
    entry_device: str = 'ENTRY'
    position_device: str = 'CURRENT_POSITION'
    plan_device: str = 'PLAN'

    def __post_init__(self):
        if not isinstance(self.host, str) or not self.host.strip():
            raise BridgeConfigError(f'host must be a non-empty address, got {self.host!r}')
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise BridgeConfigError(f'port must be an int in 0..65535, got {self.port!r}')
        for key in ('max_image_bytes', 'max_message_bytes', 'max_clients', 'rate_burst', 'max_send_buffer_bytes',
                    'max_inbound_bytes'):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise BridgeConfigError(f'{key} must be a positive int, got {v!r}')
        if self.max_inbound_bytes < self.max_image_bytes:
            raise BridgeConfigError(f'max_inbound_bytes ({self.max_inbound_bytes}) must hold at least one image '
                                    f'(max_image_bytes {self.max_image_bytes})')
        for key in ('max_coordinate_mm', 'rigid_tolerance', 'message_timeout_s', 'idle_timeout_s',
                    'auth_timeout_s', 'rate_limit_hz', 'refusal_report_interval_s'):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise BridgeConfigError(f'{key} must be finite and > 0, got {v!r}')
        self.commands = tuple(str(c).upper() for c in self.commands)
        if not self.commands:
            raise BridgeConfigError('commands must not be empty')
        for key in ('target_device', 'entry_device', 'position_device', 'plan_device'):
            v = getattr(self, key)
            if not v or len(v.encode('ascii')) > DEVICE_NAME_BYTES:
                raise BridgeConfigError(f'{key} must be 1..{DEVICE_NAME_BYTES} ASCII bytes, got {v!r}')
        self.allowed_clients = tuple(str(a).strip() for a in self.allowed_clients if str(a).strip())
        for entry in self.allowed_clients:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise BridgeConfigError(f'allowed_clients: {entry!r} is not an address or network') from None
        if not isinstance(self.shared_secret, str):
            raise BridgeConfigError('shared_secret must be text')
        if self.shared_secret and len(self.shared_secret) < 16:
            raise BridgeConfigError('shared_secret must be at least 16 characters')
        if not self.loopback_only and not (self.allowed_clients and self.shared_secret):
            raise BridgeConfigError(f'host {self.host!r} is reachable from the network: binding it needs both '
                                    'allowed_clients (who may connect) and shared_secret (STRING AUTH); '
                                    'use 127.0.0.1 otherwise')

    @property
    def loopback_only(self) -> bool:
        """True when the bind address is reachable from this machine only."""
        if self.host == 'localhost':
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def server_settings(self) -> ServerSettings:
        return ServerSettings(max_clients=self.max_clients, message_timeout_s=self.message_timeout_s,
                              idle_timeout_s=self.idle_timeout_s, auth_timeout_s=self.auth_timeout_s,
                              rate_limit_hz=self.rate_limit_hz, rate_burst=self.rate_burst,
                              max_send_buffer_bytes=self.max_send_buffer_bytes,
                              max_inbound_bytes=self.max_inbound_bytes, allowed_clients=self.allowed_clients,
                              shared_secret=self.shared_secret)


@dataclasses.dataclass(frozen=True)
class ImageData:
    """A received image. ``voxels`` axes (k, j, i[, component]) as sent; ``ijk_to_lps_m`` maps
    voxel indices (i, j, k, 1) to scanner LPS metres (spacing and origin in m)."""

    name: str
    voxels: np.ndarray
    ijk_to_lps_m: np.ndarray
    timestamp: float


class _Refusal(Exception):
    def __init__(self, code: StatusCode, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _clip(text: str, limit: int) -> str:
    raw = text.encode('ascii', errors='replace')[:limit]
    return raw.decode('ascii')


def _check_finite(array: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(array)):
        raise _Refusal(StatusCode.INVALID, f'{what} contains NaN or infinite values')


class RefusalDigest:
    """Refusals of each client gathered into one record per interval (count, codes, first examples)."""

    EXAMPLES = 3

    def __init__(self, interval_s: float):
        self.interval_s = float(interval_s)
        self._open: Dict[Any, dict] = {}

    def add(self, key, peer: str, now: float, device: str, message_type: str, code: int, reason: str) -> None:
        entry = self._open.get(key)
        if entry is None:
            entry = self._open[key] = {'peer': peer, 'since': now, 'count': 0,
                                       'codes': collections.Counter(), 'examples': []}
        entry['count'] += 1
        name = StatusCode(code).name if code in StatusCode._value2member_map_ else str(code)
        entry['codes'][name] += 1
        if len(entry['examples']) < self.EXAMPLES:
            entry['examples'].append({'device': device, 'type': message_type, 'code': int(code), 'reason': reason})

    def due(self, now: float, key=None) -> List[dict]:
        """Close and return the digests whose interval is over (or the one of ``key``, now)."""
        keys = [key] if key is not None else [k for k, e in self._open.items() if now - e['since'] >= self.interval_s]
        out = []
        for k in keys:
            entry = self._open.pop(k, None)
            if entry is not None:
                out.append({'client': k, 'peer': entry['peer'], 'count': entry['count'],
                            'codes': dict(entry['codes']), 'examples': entry['examples'],
                            'interval_s': round(now - entry['since'], 3)})
        return out


def _normalise_reply(result, what: str) -> Tuple[bool, str]:
    """Callback result -> (ok, reason). None means accepted; bool or (bool, reason) otherwise."""
    if result is None:
        return True, ''
    if isinstance(result, (bool, np.bool_)):
        return bool(result), ''
    if isinstance(result, (tuple, list)) and len(result) == 2:
        return bool(result[0]), str(result[1])
    raise TypeError(f'{what} handler must return None, bool or (ok, reason); got {result!r}')


class BridgeCore:
    """Protocol logic of the Slicer bridge plus its TCP server (``start``/``stop``).

    Callbacks (all optional; a missing one makes the matching input refused):

    * ``on_target(p_lps_m)``, ``on_entry(p_lps_m)`` -> None | bool | (ok, reason); p is (3,) scanner LPS m.
    * ``on_calibration(T_scanner_zframe)`` -> same; 4x4, scanner LPS, translation in m.
    * ``on_image(ImageData)`` -> same.
    * ``on_command(name, arg)`` -> (ok, reason); name is one of ``config.commands``.
    * ``on_status(device, code, error_name, text)`` and ``on_string(device, text)``: notifications.
    * ``on_event(kind, details)``: every accepted input and connection change, and one ``refused``
      digest per client per interval, for the procedure record.
    * ``status_provider()`` -> (code, error_name, text): the answer to GET_STATUS (default: the link's).

    :meth:`handle_message` is the pure decision (message in, replies out) and
    can be used without sockets.
    """

    def __init__(self, config: Optional[BridgeConfig] = None, *, on_target=None, on_entry=None,
                 on_calibration=None, on_image=None, on_command: Optional[CommandHandler] = None,
                 on_status=None, on_string=None, on_event=None, status_provider=None,
                 clock: Callable[[], float] = time.time):
        self.config = config or BridgeConfig()
        self.on_target = on_target
        self.on_entry = on_entry
        self.on_calibration = on_calibration
        self.on_image = on_image
        self.on_command = on_command
        self.on_status = on_status
        self.on_string = on_string
        self.on_event = on_event
        self.status_provider = status_provider
        self._clock = clock
        self._lock = threading.Lock()
        self.target_lps_m: Optional[np.ndarray] = None
        self.entry_lps_m: Optional[np.ndarray] = None
        self.calibration: Optional[np.ndarray] = None
        self.counters: Dict[str, int] = {'received': 0, 'accepted': 0, 'refused': 0, 'sent': 0}
        self.last_refusal: Optional[Tuple[str, str, int, str]] = None
        self._digest = RefusalDigest(self.config.refusal_report_interval_s)
        self._server: Optional[IgtlServer] = None

    # ================================================================ server
    def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        if self._server is not None:
            return self._server.port
        self._server = IgtlServer(self.config.host, self.config.port, on_message=self._server_message,
                                  on_refused=self._server_refusal, limit_for=self._limit_for,
                                  settings=self.config.server_settings(), on_connection=self._on_connection,
                                  on_turned_away=self._on_turned_away,
                                  is_priority=self.is_priority, on_tick=self._flush_refusals)
        self._server.start()
        if not self.config.loopback_only:
            _log.warning('OpenIGTLink bridge listening on %s:%d for %s (shared secret required)', self.config.host,
                         self._server.port, ', '.join(self.config.allowed_clients))
        return self._server.port

    def stop(self) -> None:
        """Stop serving and close any connection (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> 'BridgeCore':
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> Optional[int]:
        return self._server.port if self._server else None

    @property
    def connected(self) -> bool:
        """At least one (authenticated) client is connected."""
        return bool(self._server is not None and self._server.connected)

    def clients(self) -> List[dict]:
        return self._server.clients() if self._server is not None else []

    def _limit_for(self, message_type: str) -> int:
        return self.config.max_image_bytes if message_type == 'IMAGE' else self.config.max_message_bytes

    def _current_client(self):
        server = self._server
        return server.current_client if server is not None else None

    def _on_connection(self, connected: bool, address, reason: str) -> None:
        client = self._current_client()
        client_id = client.id if client is not None else None
        peer = client.peer if client else str(address)
        if not connected:
            self._flush_refusals(time.monotonic(), key=client_id)
        self._event('connection', {'connected': connected, 'peer': peer, 'client': client_id, 'reason': reason})

    def _on_turned_away(self, address, reason: str) -> None:
        """A connection closed at accept (allow-list, no free slot): a connection flood is one digest per
        address per interval, like refused messages."""
        host = address[0]
        with self._lock:
            self.counters['refused'] += 1
            self._digest.add(f'connections from {host}', host, time.monotonic(), '', 'CONNECTION',
                             StatusCode.ACCESS_DENIED if 'allow-list' in reason else StatusCode.BUSY, reason)

    def _server_message(self, message) -> List[Any]:
        client = self._current_client()
        return self.handle_message(message, client=client.id if client is not None else None)

    def _server_refusal(self, device, message_type, code, reason) -> List[Any]:
        client = self._current_client()
        return self.refusal(device, message_type, code, reason, client=client.id if client else None,
                            peer=client.peer if client else '')

    def is_priority(self, message) -> bool:
        """EMERGENCY and STOP commands pass the rate limit: stopping is never throttled."""
        device = getattr(message, 'device_name', '') or ''
        if getattr(message, 'message_type', '') != 'STRING' or not device.upper().startswith('CMD_'):
            return False
        try:
            name = self.parse_command(device, message.string)[0]
        except _Refusal:
            return False
        return name in PRIORITY_COMMANDS

    def _flush_refusals(self, now: float, key=None) -> None:
        with self._lock:
            digests = self._digest.due(now, key)
        for digest in digests:
            self._event('refused', digest)

    # ================================================================ sending
    def _send(self, message, to: Optional[int] = None) -> bool:
        server = self._server
        if server is None or not server.send(message, to):
            return False
        with self._lock:
            self.counters['sent'] += 1
        return True

    def current_position_message(self, T_scanner_tip: np.ndarray) -> _pm.TransformMessage:
        """TRANSFORM CURRENT_POSITION (RAS mm) from the needle pose in scanner LPS m (4x4)."""
        T = np.asarray(T_scanner_tip, dtype=float)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError(f'needle pose must be a finite 4x4 transform, got shape {T.shape}')
        T_ras_mm = units.transform_m_to_mm(frames.lps_to_ras(T))
        message = _pm.TransformMessage(T_ras_mm, device_name=self.config.position_device, timestamp=self._clock())
        message.metadata = dict(GEOMETRY_METADATA, frame='needle_tip')
        return message

    def send_current_position(self, T_scanner_tip: np.ndarray) -> bool:
        """Send the needle pose (T_scanner_tip: tip frame -> scanner LPS, m; z axis along the needle).
        False when no client is connected (nothing is queued for later)."""
        return self._send(self.current_position_message(T_scanner_tip))

    def plan_message(self, entry_lps_m, target_lps_m) -> _pm.PointMessage:
        """POINT PLAN with points ENTRY and TARGET (RAS mm) from scanner LPS metres."""
        pts = np.array([entry_lps_m, target_lps_m], dtype=float)
        if pts.shape != (2, 3) or not np.all(np.isfinite(pts)):
            raise ValueError('entry and target must be finite 3-vectors (scanner LPS, m)')
        ras_mm = units.m_to_mm(frames.lps_to_ras(pts))
        message = _pm.PointMessage(positions=ras_mm, names=['ENTRY', 'TARGET'], groups='PLAN',
                                   rgba_colors=[[0, 200, 0, 255], [255, 0, 0, 255]], owners='igt_robot',
                                   device_name=self.config.plan_device, timestamp=self._clock())
        message.metadata = dict(GEOMETRY_METADATA)
        return message

    def send_plan(self, entry_lps_m, target_lps_m, to: Optional[int] = None) -> bool:
        return self._send(self.plan_message(entry_lps_m, target_lps_m), to)

    def status_message(self, device: str, code: int, error_name: str = '', text: str = '') -> StatusMessage:
        return StatusMessage(code=int(code), error_name=_clip(error_name, ERROR_NAME_BYTES), status_string=text,
                             device_name=_clip(device or 'STATUS', DEVICE_NAME_BYTES), timestamp=self._clock())

    def send_status(self, device: str, code: int = StatusCode.OK, error_name: str = '', text: str = '',
                    to: Optional[int] = None) -> bool:
        """STATUS to client ``to`` (None: every client); False when there is no such client."""
        return self._send(self.status_message(device, code, error_name, text), to)

    def current_status(self) -> Tuple[int, str, str]:
        """(code, error name, text) answered to GET_STATUS."""
        if self.status_provider is not None:
            code, name, text = self.status_provider()
            return int(code), str(name), str(text)
        n = len(self.clients())
        return int(StatusCode.OK), 'OK', f'OpenIGTLink bridge running, {n} client(s) connected'

    # ================================================================ receiving
    def refusal(self, device: str, message_type: str, code: int, reason: str, client=None,
                peer: str = '') -> List[StatusMessage]:
        """STATUS reply refusing one message; counts it and adds it to the client's refusal digest
        (one ``refused`` event per client per interval). State is untouched."""
        code = StatusCode(int(code)) if int(code) in StatusCode._value2member_map_ else int(code)
        name = code.name if isinstance(code, StatusCode) else 'ERROR'
        with self._lock:
            self.counters['refused'] += 1
            self.last_refusal = (device, message_type, int(code), reason)
            self._digest.add(client, peer, time.monotonic(), device, message_type, int(code), reason)
        _log.debug('refused %s %r: %s', message_type, device, reason)
        return [self.status_message(device or message_type, int(code), name, reason)]

    def handle_message(self, message, client=None) -> List[Any]:
        """Decide on one decoded message from ``client`` (an id, None without sockets); return the replies."""
        with self._lock:
            self.counters['received'] += 1
        mtype = getattr(message, 'message_type', '?')
        device = getattr(message, 'device_name', '') or ''
        try:
            handler = {
                'STRING': self._handle_string, 'POINT': self._handle_point, 'TRANSFORM': self._handle_transform,
                'IMAGE': self._handle_image, 'STATUS': self._handle_status, 'GET_STATUS': self._handle_get_status,
            }.get(mtype)
            if handler is None:
                raise _Refusal(StatusCode.ILLEGAL_INSTRUCTION, f'message type {mtype} is not supported')
            replies = handler(message, device)
        except _Refusal as r:
            return self.refusal(device, mtype, r.code, r.reason, client=client)
        except Exception as exc:  # a failing callback: refuse, keep the link
            _log.exception('bridge handler failed for %s %r', mtype, device)
            return self.refusal(device, mtype, StatusCode.UNKNOWN_ERROR,
                                f'internal error: {type(exc).__name__}: {exc}', client=client)
        with self._lock:
            self.counters['accepted'] += 1
        return replies

    # ---------------------------------------------------------------- STRING / commands
    def parse_command(self, device: str, text: str) -> Tuple[str, str, str]:
        """(command, argument, query id) of a command message; raises _Refusal when not acceptable.

        Accepted: device ``CMD_<id>`` (id: 1-16 of [A-Za-z0-9_]) with text ``NAME``, ``NAME:arg``,
        ``NAME=arg`` or ``NAME arg``; or, with empty text, device ``CMD_<NAME>`` (the id is then NAME).
        Names are case-insensitive.
        """
        query_id = device[4:]
        if not _ID_RE.match(query_id):
            raise _Refusal(StatusCode.INVALID, f'command device {device!r} must be CMD_<id> with 1-16 '
                                               'characters [A-Za-z0-9_]')
        text = text or ''
        if text.strip():
            m = _TEXT_RE.match(text)
            if not m:
                raise _Refusal(StatusCode.ILLEGAL_INSTRUCTION, f'cannot read a command in {text[:60]!r}')
            name, arg = m.group(1).upper(), m.group(2)
        else:
            name, arg = query_id.upper(), ''
        if name not in self.config.commands:
            raise _Refusal(StatusCode.ILLEGAL_INSTRUCTION,
                           f'unknown command {name!r}; accepted: {", ".join(self.config.commands)}')
        return name, arg, query_id

    def _handle_string(self, message, device: str) -> List[Any]:
        text = message.string
        if device.upper().startswith('CMD_'):
            name, arg, query_id = self.parse_command(device, text)
            ack = _pm.StringMessage(text if text.strip() else name, device_name=f'ACK_{query_id}',
                                    timestamp=self._clock())
            if self.on_command is None:
                ok, reason = False, 'no command handler is connected'
            else:
                ok, reason = _normalise_reply(self.on_command(name, arg), 'command')
            self._event('command', {'command': name, 'argument': arg, 'query_id': query_id, 'accepted': ok,
                                    'reason': reason})
            status = self.status_message(name, StatusCode.OK if ok else StatusCode.NOT_READY,
                                         '' if ok else 'REFUSED', reason)
            return [ack, status]
        if self.on_string is not None:
            self.on_string(device, text)
            return []
        raise _Refusal(StatusCode.NOT_FOUND, f'STRING device {device!r} is not handled (commands use CMD_<id>)')

    # ---------------------------------------------------------------- points and transforms
    def _point_mm_to_lps_m(self, ras_mm, what: str) -> np.ndarray:
        p = np.asarray(ras_mm, dtype=float).reshape(-1)
        if p.shape != (3,):
            raise _Refusal(StatusCode.INVALID, f'{what} must have 3 coordinates, got {p.size}')
        _check_finite(p, what)
        if np.max(np.abs(p)) > self.config.max_coordinate_mm:
            raise _Refusal(StatusCode.INVALID, f'{what} {np.round(p, 1).tolist()} mm is beyond '
                                               f'±{self.config.max_coordinate_mm:g} mm (wrong unit?)')
        return units.mm_to_m(frames.ras_to_lps(p))

    def _apply_point(self, which: str, p_lps_m: np.ndarray, device: str, source: str) -> List[Any]:
        callback = self.on_target if which == 'target' else self.on_entry
        if callback is None:
            raise _Refusal(StatusCode.NOT_FOUND, f'{which} points are not accepted (no handler)')
        ok, reason = _normalise_reply(callback(p_lps_m.copy()), which)
        if not ok:
            raise _Refusal(StatusCode.NOT_READY, reason or f'{which} refused')
        with self._lock:
            setattr(self, f'{which}_lps_m', p_lps_m)
        self._event(which, {f'{which}_lps_m': p_lps_m.tolist(), 'device': device, 'source': source})
        return [self.status_message(device, StatusCode.OK, '', reason or f'{which} accepted')]

    def _which_point(self, device: str) -> Optional[str]:
        d = device.strip().upper()
        if d == self.config.target_device.upper():
            return 'target'
        if d == self.config.entry_device.upper():
            return 'entry'
        return None

    def _handle_point(self, message, device: str) -> List[Any]:
        which = self._which_point(device)
        if which is None:
            expected = f'{self.config.target_device} or {self.config.entry_device}'
            raise _Refusal(StatusCode.NOT_FOUND, f'POINT device {device!r} is not handled (expected {expected})')
        positions = list(message.positions or [])
        if len(positions) != 1:
            raise _Refusal(StatusCode.INVALID, f'POINT {device} must carry exactly one point, got {len(positions)}')
        p = self._point_mm_to_lps_m(positions[0], f'{which} point')
        return self._apply_point(which, p, device, 'POINT')

    def _matrix(self, message, device: str) -> np.ndarray:
        M = np.asarray(message.matrix, dtype=float)
        if M.shape != (4, 4):
            raise _Refusal(StatusCode.INVALID, f'TRANSFORM {device} is not 4x4')
        _check_finite(M, f'TRANSFORM {device}')
        return M

    def _check_rigid(self, M: np.ndarray, device: str) -> None:
        R = M[:3, :3]
        ortho = float(np.max(np.abs(R.T @ R - np.eye(3))))
        det = float(np.linalg.det(R))
        tol = self.config.rigid_tolerance
        if ortho > tol or abs(det - 1.0) > tol:
            raise _Refusal(StatusCode.INVALID, f'TRANSFORM {device} is not a rigid transform '
                                               f'(|RᵀR-I| = {ortho:.2g}, det = {det:.4f})')

    def _handle_transform(self, message, device: str) -> List[Any]:
        M = self._matrix(message, device)
        upper = device.upper()
        which = self._which_point(device)
        if which is not None:
            p = self._point_mm_to_lps_m(M[:3, 3], f'{which} transform translation')
            return self._apply_point(which, p, device, 'TRANSFORM')
        if upper.startswith('TGT_') and _ID_RE.match(device[4:]):
            p = self._point_mm_to_lps_m(M[:3, 3], 'target transform translation')
            replies = self._apply_point('target', p, device, 'TRANSFORM')
            ack = _pm.TransformMessage(message.matrix, device_name=f'ACK_{device[4:]}', timestamp=self._clock())
            return [ack, self.status_message('TARGET', StatusCode.OK, '', replies[0].status_string)]
        if upper.startswith('CLB_') and _ID_RE.match(device[4:]):
            self._check_rigid(M, device)
            self._point_mm_to_lps_m(M[:3, 3], 'calibration translation')  # range check only
            T = units.transform_mm_to_m(frames.ras_to_lps(M))
            if self.on_calibration is None:
                raise _Refusal(StatusCode.NOT_FOUND, 'calibration is not accepted (no handler)')
            ok, reason = _normalise_reply(self.on_calibration(T.copy()), 'calibration')
            if not ok:
                raise _Refusal(StatusCode.NOT_READY, reason or 'calibration refused')
            with self._lock:
                self.calibration = T
            self._event('calibration', {'T_scanner_zframe': T.tolist(), 'device': device})
            ack = _pm.TransformMessage(message.matrix, device_name=f'ACK_{device[4:]}', timestamp=self._clock())
            return [ack, self.status_message('CALIBRATION', StatusCode.OK, '', reason or 'calibration accepted')]
        raise _Refusal(StatusCode.NOT_FOUND, f'TRANSFORM device {device!r} is not handled')

    # ---------------------------------------------------------------- images and status
    def _handle_image(self, message, device: str) -> List[Any]:
        if self.on_image is None:
            raise _Refusal(StatusCode.NOT_FOUND, 'images are not accepted (no handler)')
        voxels = np.asarray(message.image)
        if voxels.ndim not in (3, 4) or voxels.size == 0:
            raise _Refusal(StatusCode.INVALID, f'IMAGE {device} has shape {voxels.shape}; (k, j, i[, c]) expected')
        M = np.asarray(message.ijk_to_world_matrix, dtype=float)
        _check_finite(M, f'IMAGE {device} matrix')
        spacing = np.linalg.norm(M[:3, :3], axis=0)
        if np.any(spacing <= 0.0) or abs(np.linalg.det(M[:3, :3])) < 1e-12:
            raise _Refusal(StatusCode.INVALID, f'IMAGE {device} has a degenerate voxel matrix '
                                               f'(spacing {np.round(spacing, 4).tolist()} mm)')
        if message.world_coordinate_system == 'ras':
            M = frames.ras_to_lps(M)
        ijk_to_lps_m = M.copy()
        # Spacing columns and origin are all lengths in mm: convert the whole upper 3x4 block.
        ijk_to_lps_m[:3, :] = units.mm_to_m(M[:3, :])
        image = ImageData(name=device, voxels=voxels, ijk_to_lps_m=ijk_to_lps_m, timestamp=float(message.timestamp))
        ok, reason = _normalise_reply(self.on_image(image), 'image')
        if not ok:
            raise _Refusal(StatusCode.NOT_READY, reason or 'image refused')
        self._event('image', {'device': device, 'shape': list(voxels.shape), 'dtype': str(voxels.dtype)})
        return [self.status_message(device, StatusCode.OK, '', reason or 'image received')]

    def _handle_get_status(self, message, device: str) -> List[Any]:
        code, name, text = self.current_status()
        return [self.status_message(device or 'STATUS', code, name, text)]

    def _handle_status(self, message, device: str) -> List[Any]:
        # Never answer a STATUS with a STATUS: two bridges would ping-pong forever.
        if self.on_status is not None:
            self.on_status(device, int(message.code), message.error_name, message.status_string)
        return []

    # ---------------------------------------------------------------- record
    def _event(self, kind: str, details: Dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, details)
            except Exception:
                _log.exception('bridge on_event callback failed')

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            return {**self.counters, 'connected': self.connected,
                    'target_lps_m': None if self.target_lps_m is None else self.target_lps_m.tolist(),
                    'entry_lps_m': None if self.entry_lps_m is None else self.entry_lps_m.tolist(),
                    'last_refusal': self.last_refusal}
