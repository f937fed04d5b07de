"""OpenIGTLink STATUS message for pyigtl, plus the protocol's status codes.

pyigtl (0.3) ships IMAGE, TRANSFORM, STRING, POINT and POSITION but no STATUS.
STATUS body (OpenIGTLink v2/v3): code uint16, sub-code int64, error name
char[20] (NUL padded), status text (NUL terminated), all big-endian.
Importing this module registers the class with pyigtl's message factory so that
pyigtl clients and servers decode STATUS too (registration only adds the missing
type; existing ones are never replaced).
"""
from __future__ import annotations

import enum
import struct

from pyigtl import messages as _pyigtl_messages


class StatusCode(enum.IntEnum):
    """Status codes defined by the OpenIGTLink specification."""

    INVALID = 0
    OK = 1
    UNKNOWN_ERROR = 2
    PANIC_MODE = 3
    NOT_FOUND = 4
    ACCESS_DENIED = 5
    BUSY = 6
    TIME_OUT = 7
    OVERFLOW = 8
    CHECKSUM_ERROR = 9
    CONFIG_ERROR = 10
    RESOURCE_ERROR = 11
    ILLEGAL_INSTRUCTION = 12
    NOT_READY = 13
    MANUAL_MODE = 14
    DISABLED = 15
    NOT_PRESENT = 16
    UNKNOWN_VERSION = 17
    HARDWARE_FAILURE = 18
    SHUT_DOWN = 19


ERROR_NAME_BYTES = 20
DEVICE_NAME_BYTES = 20
_STATUS_HEAD = struct.Struct('> H q 20s')


class StatusMessage(_pyigtl_messages.MessageBase):
    """OpenIGTLink STATUS: ``code`` (StatusCode), ``subcode``, ``error_name`` (<=20 bytes), ``status_string``."""

    def __init__(self, code=StatusCode.OK, subcode=0, error_name='', status_string='', timestamp=None,
                 device_name=None):
        super().__init__(timestamp=timestamp, device_name=device_name)
        self._message_type = 'STATUS'
        self.code = int(code)
        self.subcode = int(subcode)
        self.error_name = str(error_name)
        self.status_string = str(status_string)
        if not 0 <= self.code <= 0xFFFF:
            raise ValueError(f'STATUS code must fit in uint16, got {self.code}')
        if len(self.error_name.encode('utf8')) > ERROR_NAME_BYTES:
            raise ValueError(f'STATUS error name is limited to {ERROR_NAME_BYTES} bytes: {self.error_name!r}')
        self._valid_message = True

    @property
    def ok(self) -> bool:
        return self.code == StatusCode.OK

    def content_asstring(self):
        return f'Code: {self.code}, subcode: {self.subcode}, name: {self.error_name!r}, text: {self.status_string!r}'

    def _pack_content(self):
        return (_STATUS_HEAD.pack(self.code, self.subcode, self.error_name.encode('utf8'))
                + self.status_string.encode('utf8') + b'\0')

    def _unpack_content(self, content):
        if len(content) < _STATUS_HEAD.size:
            raise ValueError(f'STATUS body is {len(content)} bytes, at least {_STATUS_HEAD.size} expected')
        code, subcode, name = _STATUS_HEAD.unpack(content[:_STATUS_HEAD.size])
        self.code = code
        self.subcode = subcode
        self.error_name = name.split(b'\0', 1)[0].decode('utf8', errors='replace')
        self.status_string = content[_STATUS_HEAD.size:].split(b'\0', 1)[0].decode('utf8', errors='replace')


def register_status_message() -> None:
    """Let pyigtl's factory create STATUS messages (idempotent, additive only)."""
    _pyigtl_messages.message_type_to_class_constructor.setdefault('STATUS', StatusMessage)


register_status_message()
