"""OpenIGTLink bridge core: 3D Slicer <-> robot, independent of ROS.

Wire conventions (docs/igtl_protocol.md has the full table):

* Coordinates on the wire are **RAS millimetres** (Slicer's world). Inside, and
  in every callback, they are **scanner LPS metres**, converted here with
  :func:`igt_robot.frames.ras_to_lps` and :mod:`igt_robot.units` only.
* Incoming: POINT/TRANSFORM ``TARGET`` and ``ENTRY``; TRANSFORM ``TGT_<id>``
  (BRP target) and ``CLB_<id>`` (BRP calibration: Z-frame pose); IMAGE (any
  name); STRING ``CMD_<id>`` commands; STATUS (passed on, never answered).
* Commands (BRP robot protocol): START_UP, PLANNING, CALIBRATION, TARGETING,
  MOVE_TO_TARGET, STOP, EMERGENCY. Reply: STRING ``ACK_<id>`` echoing the text,
  then STATUS named after the command, code OK (1) or an error code with the
  reason from ``on_command``.
* Outgoing: TRANSFORM ``CURRENT_POSITION`` (needle pose), POINT ``PLAN`` (points
  ENTRY and TARGET), STATUS.
* Anything refused (unknown command/device/type, NaN or non-rigid matrix, too
  large, bad CRC, undecodable) gets a STATUS named after the offending device
  with a non-OK code and the reason; the connection and all bridge state
  (last target, entry, calibration) stay as they were.

Callbacks run on the server thread; keep them short (queue work, don't block).
"""
from __future__ import annotations

import dataclasses
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
from .server import IgtlServer

_log = logging.getLogger(__name__)

BRP_COMMANDS: Tuple[str, ...] = ('START_UP', 'PLANNING', 'CALIBRATION', 'TARGETING', 'MOVE_TO_TARGET',
                                 'STOP', 'EMERGENCY')
MIB = 1 << 20

_ID_RE = re.compile(r'^[A-Za-z0-9_]{1,16}$')
_TEXT_RE = re.compile(r'^\s*([A-Za-z_]+)\s*(?:[:=]\s*|\s+|$)(.*?)\s*$', re.DOTALL)

CommandHandler = Callable[[str, str], Any]


class BridgeConfigError(ValueError):
    """Invalid bridge configuration; the message names the key."""


@dataclasses.dataclass
class BridgeConfig:
    """Bridge settings. Sizes in bytes, coordinates limit in mm (wire unit), times in s.

    host                  bind address; 127.0.0.1 unless a remote Slicer must connect.
    port                  TCP port (18944 is the OpenIGTLink default; 0 = pick a free one).
    max_image_bytes       largest IMAGE body accepted (larger ones are drained and refused).
    max_message_bytes     largest body of any other message type.
    max_coordinate_mm     |x|,|y|,|z| beyond this (RAS mm) is refused as implausible.
    rigid_tolerance       max |RᵀR - I| and |det R - 1| for calibration transforms.
    body_timeout_s        a message stalled mid-body this long closes the connection.
    commands              command names accepted in CMD_ messages.
    """

    host: str = '127.0.0.1'
    port: int = 18944
    max_image_bytes: int = 64 * MIB
    max_message_bytes: int = 1 * MIB
    max_coordinate_mm: float = 5000.0
    rigid_tolerance: float = 1e-3
    body_timeout_s: float = 5.0
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
        for key in ('max_image_bytes', 'max_message_bytes'):
            v = getattr(self, key)
            if not isinstance(v, int) or v <= 0:
                raise BridgeConfigError(f'{key} must be a positive int (bytes), got {v!r}')
        for key in ('max_coordinate_mm', 'rigid_tolerance', 'body_timeout_s'):
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
    * ``on_event(kind, details)``: every accepted/refused input, for the procedure record.

    :meth:`handle_message` is the pure decision (message in, replies out) and
    can be used without sockets.
    """

    def __init__(self, config: Optional[BridgeConfig] = None, *, on_target=None, on_entry=None,
                 on_calibration=None, on_image=None, on_command: Optional[CommandHandler] = None,
                 on_status=None, on_string=None, on_event=None, clock: Callable[[], float] = time.time):
        self.config = config or BridgeConfig()
        self.on_target = on_target
        self.on_entry = on_entry
        self.on_calibration = on_calibration
        self.on_image = on_image
        self.on_command = on_command
        self.on_status = on_status
        self.on_string = on_string
        self.on_event = on_event
        self._clock = clock
        self._lock = threading.Lock()
        self.target_lps_m: Optional[np.ndarray] = None
        self.entry_lps_m: Optional[np.ndarray] = None
        self.calibration: Optional[np.ndarray] = None
        self.counters: Dict[str, int] = {'received': 0, 'accepted': 0, 'refused': 0, 'sent': 0}
        self.last_refusal: Optional[Tuple[str, str, int, str]] = None
        self._server: Optional[IgtlServer] = None

    # ================================================================ server
    def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        if self._server is not None:
            return self._server.port
        self._server = IgtlServer(self.config.host, self.config.port, on_message=self.handle_message,
                                  on_refused=self.refusal, limit_for=self._limit_for,
                                  body_timeout_s=self.config.body_timeout_s, on_connection=self._on_connection)
        self._server.start()
        if self.config.host not in ('127.0.0.1', 'localhost', '::1'):
            _log.warning('OpenIGTLink bridge listening on %s:%d (not loopback only)', self.config.host,
                         self._server.port)
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
        return bool(self._server is not None and self._server.is_connected())

    def _limit_for(self, message_type: str) -> int:
        return self.config.max_image_bytes if message_type == 'IMAGE' else self.config.max_message_bytes

    def _on_connection(self, connected: bool, address) -> None:
        self._event('connection', {'connected': connected, 'peer': f'{address[0]}:{address[1]}'})

    # ================================================================ sending
    def _send(self, message) -> bool:
        server = self._server
        if server is None or not server.send(message):
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
        return _pm.TransformMessage(T_ras_mm, device_name=self.config.position_device, timestamp=self._clock())

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
        return _pm.PointMessage(positions=ras_mm, names=['ENTRY', 'TARGET'], groups='PLAN',
                                rgba_colors=[[0, 200, 0, 255], [255, 0, 0, 255]], owners='igt_robot',
                                device_name=self.config.plan_device, timestamp=self._clock())

    def send_plan(self, entry_lps_m, target_lps_m) -> bool:
        return self._send(self.plan_message(entry_lps_m, target_lps_m))

    def status_message(self, device: str, code: int, error_name: str = '', text: str = '') -> StatusMessage:
        return StatusMessage(code=int(code), error_name=_clip(error_name, ERROR_NAME_BYTES), status_string=text,
                             device_name=_clip(device or 'STATUS', DEVICE_NAME_BYTES), timestamp=self._clock())

    def send_status(self, device: str, code: int = StatusCode.OK, error_name: str = '', text: str = '') -> bool:
        return self._send(self.status_message(device, code, error_name, text))

    # ================================================================ receiving
    def refusal(self, device: str, message_type: str, code: int, reason: str) -> List[StatusMessage]:
        """STATUS reply refusing one message; counts and records it. State is untouched."""
        code = StatusCode(int(code)) if int(code) in StatusCode._value2member_map_ else int(code)
        name = code.name if isinstance(code, StatusCode) else 'ERROR'
        with self._lock:
            self.counters['refused'] += 1
            self.last_refusal = (device, message_type, int(code), reason)
        self._event('refused', {'device': device, 'type': message_type, 'code': int(code), 'reason': reason})
        _log.info('refused %s %r: %s', message_type, device, reason)
        return [self.status_message(device or message_type, int(code), name, reason)]

    def handle_message(self, message) -> List[Any]:
        """Decide on one decoded message; return the replies to send (possibly empty)."""
        with self._lock:
            self.counters['received'] += 1
        mtype = getattr(message, 'message_type', '?')
        device = getattr(message, 'device_name', '') or ''
        try:
            handler = {
                'STRING': self._handle_string, 'POINT': self._handle_point, 'TRANSFORM': self._handle_transform,
                'IMAGE': self._handle_image, 'STATUS': self._handle_status,
            }.get(mtype)
            if handler is None:
                raise _Refusal(StatusCode.ILLEGAL_INSTRUCTION, f'message type {mtype} is not supported')
            replies = handler(message, device)
        except _Refusal as r:
            return self.refusal(device, mtype, r.code, r.reason)
        except Exception as exc:  # a failing callback: refuse, keep the link
            _log.exception('bridge handler failed for %s %r', mtype, device)
            return self.refusal(device, mtype, StatusCode.UNKNOWN_ERROR, f'internal error: {type(exc).__name__}: {exc}')
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
            raise _Refusal(StatusCode.NOT_FOUND, f'POINT device {device!r} is not handled '
                                                 f'(expected {self.config.target_device} or {self.config.entry_device})')
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
