"""OpenIGTLink wire codec: header v1/v2 framing, body checks, STATUS and GET_STATUS (no rclpy).

pyigtl (0.3) ships the content codecs of IMAGE, TRANSFORM, STRING, POINT and
POSITION but no STATUS, no query (GET_) messages, and it trusts every length
field it reads (a STRING whose length exceeds its body is silently truncated; a
v2 metadata block pointing past the body raises or returns garbage). This module
adds what the bridge needs, and does the checking itself:

* :func:`split_body` takes a received body apart (header v1: all content; v2:
  extended header, content, metadata) and refuses any size field that does not
  add up, with :class:`BodyError` (code + reason, the connection stays usable
  because the outer framing - the header's body size - was intact).
* :func:`check_content` checks the inner length fields of the content of the
  types the bridge decodes (STRING, TRANSFORM, POINT, STATUS, IMAGE).
* :func:`encode` packs a pyigtl message with header v1 (no metadata) or v2
  (extended header, message id, metadata), so each client gets the header
  version it speaks.

STATUS body (OpenIGTLink v2/v3): code uint16, sub-code int64, error name
char[20] (NUL padded), status text (NUL terminated), all big-endian.
GET_STATUS has an empty content: it asks the receiver for its STATUS.
Importing this module registers both with pyigtl's message factory so that
pyigtl clients and servers decode them too (registration only adds missing
types; existing ones are never replaced).
"""
from __future__ import annotations

import enum
import struct
from typing import Dict, Mapping, Optional, Tuple

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


class GetStatusMessage(_pyigtl_messages.MessageBase):
    """OpenIGTLink GET_STATUS query (empty content); the answer is a STATUS."""

    def __init__(self, timestamp=None, device_name=None):
        super().__init__(timestamp=timestamp, device_name=device_name)
        self._message_type = 'GET_STATUS'
        self._valid_message = True

    def content_asstring(self):
        return 'query: STATUS'


def register_status_message() -> None:
    """Let pyigtl's factory create STATUS and GET_STATUS messages (idempotent, additive only)."""
    _pyigtl_messages.message_type_to_class_constructor.setdefault('STATUS', StatusMessage)
    _pyigtl_messages.message_type_to_class_constructor.setdefault('GET_STATUS', GetStatusMessage)


# ============================================================================ framing and body checks
HEADER = struct.Struct('> H 12s 20s I I Q Q')
HEADER_SIZE = HEADER.size  # 58
EXTENDED_HEADER = struct.Struct('> H H I I')  # size, metadata header bytes, metadata body bytes, message id
METADATA_ENTRY = struct.Struct('> H H I')     # key bytes, value encoding (IANA MIBenum), value bytes
SUPPORTED_HEADER_VERSIONS = (1, 2)
IANA_US_ASCII = 3
IANA_UTF8 = 106
_TEXT_ENCODINGS = {IANA_US_ASCII: 'ascii', IANA_UTF8: 'utf-8'}
_IMAGE_HEAD = struct.Struct('> H B B B B 3H 12f 6H')  # 72 bytes
_IMAGE_SCALAR_BYTES = {2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 4, 10: 4, 11: 8}
_STRING_HEAD = struct.Struct('> H H')
_TRANSFORM_BYTES = 48
_POINT_ELEMENT_BYTES = 136


class BodyError(ValueError):
    """A body whose inner sizes do not add up; ``code`` is the STATUS code of the refusal."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = int(code)
        self.reason = reason


def split_body(header_version: int, body: bytes) -> Tuple[bytes, Dict[str, str], int]:
    """(content, metadata, message id) of a received body; raises BodyError when a size field lies."""
    if header_version == 1:
        return body, {}, 0
    if len(body) < EXTENDED_HEADER.size:
        raise BodyError(StatusCode.INVALID, f'header v2 body of {len(body)} bytes is shorter than the '
                                            f'{EXTENDED_HEADER.size}-byte extended header')
    ext_size, meta_head, meta_body, message_id = EXTENDED_HEADER.unpack_from(body)
    if ext_size < EXTENDED_HEADER.size:
        raise BodyError(StatusCode.INVALID, f'extended header size {ext_size} < {EXTENDED_HEADER.size}')
    if ext_size + meta_head + meta_body > len(body):
        raise BodyError(StatusCode.INVALID, f'extended header ({ext_size}) + metadata ({meta_head} + {meta_body}) '
                                            f'bytes exceed the body of {len(body)} bytes')
    metadata: Dict[str, str] = {}
    if meta_head or meta_body:
        if meta_head < 2:
            raise BodyError(StatusCode.INVALID, f'metadata header of {meta_head} bytes cannot hold its count')
        block = memoryview(body)[len(body) - meta_head - meta_body:]
        count = struct.unpack_from('> H', block)[0]
        if meta_head != 2 + count * METADATA_ENTRY.size:
            raise BodyError(StatusCode.INVALID, f'metadata header of {meta_head} bytes does not match its '
                                                f'{count} entries ({2 + count * METADATA_ENTRY.size} bytes)')
        entries = [METADATA_ENTRY.unpack_from(block, 2 + i * METADATA_ENTRY.size) for i in range(count)]
        if sum(k + v for k, _, v in entries) != meta_body:
            raise BodyError(StatusCode.INVALID, f'metadata entries add up to {sum(k + v for k, _, v in entries)} '
                                                f'bytes, the extended header says {meta_body}')
        offset = meta_head
        for key_size, encoding, value_size in entries:
            raw_key = bytes(block[offset:offset + key_size])
            raw_value = bytes(block[offset + key_size:offset + key_size + value_size])
            offset += key_size + value_size
            codec = _TEXT_ENCODINGS.get(encoding)
            if codec is None:
                raise BodyError(StatusCode.INVALID, f'metadata value encoding {encoding} is not supported '
                                                    '(US-ASCII 3 or UTF-8 106)')
            try:
                metadata[raw_key.decode('utf-8')] = raw_value.decode(codec)
            except UnicodeDecodeError as exc:
                raise BodyError(StatusCode.INVALID, f'metadata entry is not valid text: {exc}') from None
    content = bytes(body[ext_size:len(body) - meta_head - meta_body])
    return content, metadata, message_id


def check_content(message_type: str, content: bytes) -> None:
    """Refuse (BodyError, INVALID) content whose own length fields disagree with its size."""
    n = len(content)
    if message_type == 'STRING':
        if n < _STRING_HEAD.size:
            raise BodyError(StatusCode.INVALID, f'STRING content of {n} bytes has no encoding/length fields')
        encoding, length = _STRING_HEAD.unpack_from(content)
        if length != n - _STRING_HEAD.size:
            raise BodyError(StatusCode.INVALID, f'STRING length field says {length} bytes, the body holds '
                                                f'{n - _STRING_HEAD.size}')
        if encoding not in _TEXT_ENCODINGS:
            raise BodyError(StatusCode.INVALID, f'STRING encoding {encoding} is not supported '
                                                '(US-ASCII 3 or UTF-8 106)')
        try:
            content[_STRING_HEAD.size:].decode(_TEXT_ENCODINGS[encoding])
        except UnicodeDecodeError as exc:
            raise BodyError(StatusCode.INVALID, f'STRING is not valid {_TEXT_ENCODINGS[encoding]}: {exc}') from None
    elif message_type == 'TRANSFORM':
        if n != _TRANSFORM_BYTES:
            raise BodyError(StatusCode.INVALID, f'TRANSFORM content is {n} bytes, {_TRANSFORM_BYTES} expected')
    elif message_type == 'POINT':
        if n == 0 or n % _POINT_ELEMENT_BYTES:
            raise BodyError(StatusCode.INVALID, f'POINT content of {n} bytes is not a whole number of '
                                                f'{_POINT_ELEMENT_BYTES}-byte points')
    elif message_type == 'STATUS':
        if n < _STATUS_HEAD.size:
            raise BodyError(StatusCode.INVALID, f'STATUS content of {n} bytes, at least {_STATUS_HEAD.size} '
                                                'expected')
    elif message_type == 'IMAGE':
        if n < _IMAGE_HEAD.size:
            raise BodyError(StatusCode.INVALID, f'IMAGE content of {n} bytes is shorter than its '
                                                f'{_IMAGE_HEAD.size}-byte image header')
        head = _IMAGE_HEAD.unpack_from(content)
        components, scalar_type = head[1], head[2]
        sub_size = head[-3:]
        item = _IMAGE_SCALAR_BYTES.get(scalar_type)
        if item is None:
            raise BodyError(StatusCode.INVALID, f'IMAGE scalar type {scalar_type} is not supported')
        expected = components * sub_size[0] * sub_size[1] * sub_size[2] * item
        if expected != n - _IMAGE_HEAD.size:
            raise BodyError(StatusCode.INVALID, f'IMAGE header describes {expected} bytes of voxels '
                                                f'({components} x {"x".join(map(str, sub_size))} x {item} B), '
                                                f'the body holds {n - _IMAGE_HEAD.size}')
    elif message_type.startswith(('GET_', 'STP_')) and n:
        raise BodyError(StatusCode.INVALID, f'{message_type} must have an empty content, got {n} bytes')


def decode(fields: Mapping, body: bytes):
    """A pyigtl message from header fields and a CRC-checked body; None for an unknown type.

    Raises BodyError for any length field that disagrees with the body.
    """
    message_type = fields['message_type']
    message = _pyigtl_messages.MessageBase.create_message(message_type)
    if message is None:
        return None
    try:
        content, metadata, message_id = split_body(fields['header_version'], body)
        check_content(message_type, content)
    except BodyError as exc:
        raise BodyError(exc.code, f'malformed {message_type} body: {exc.reason}') from None
    message.header_version = fields['header_version']
    message._message_type = message_type
    message.device_name = fields['device_name']
    message.timestamp = fields['timestamp']
    message.metadata = metadata
    message.message_id = message_id
    try:
        message._unpack_content(content)
    except Exception as exc:  # pyigtl raises struct.error, ValueError, KeyError, ...
        raise BodyError(StatusCode.INVALID, f'malformed {message_type} body: {type(exc).__name__}: {exc}') from None
    return message


def encode(message, header_version: int = 1, metadata: Optional[Mapping[str, str]] = None,
           message_id: int = 0) -> bytes:
    """Wire bytes of ``message`` with header v1 (metadata dropped) or v2 (extended header + metadata).

    The device name must be ASCII (ValueError otherwise): every receiver must be able to read it.
    """
    content = message._pack_content()
    if header_version >= 2:
        meta_head = bytearray(struct.pack('> H', len(metadata or {})))
        meta_body = bytearray()
        for key, value in (metadata or {}).items():
            k = str(key).encode('utf-8')
            try:
                v, encoding = str(value).encode('ascii'), IANA_US_ASCII
            except UnicodeEncodeError:
                v, encoding = str(value).encode('utf-8'), IANA_UTF8
            meta_head += METADATA_ENTRY.pack(len(k), encoding, len(v))
            meta_body += k + v
        body = (EXTENDED_HEADER.pack(EXTENDED_HEADER.size, len(meta_head), len(meta_body), message_id & 0xFFFFFFFF)
                + content + bytes(meta_head) + bytes(meta_body))
        header_version = 2
    else:
        body = content
        header_version = 1
    timestamp = float(message.timestamp or 0.0)
    seconds = int(timestamp)
    fraction = min(int((timestamp - seconds) * 4294967296.0), 0xFFFFFFFF)
    device = (message.device_name or '').encode('ascii')  # UnicodeEncodeError is a ValueError
    kind = message._message_type.encode('ascii')
    if len(device) > DEVICE_NAME_BYTES or len(kind) > 12:
        raise ValueError(f'device name {message.device_name!r} or type {message._message_type!r} too long')
    return HEADER.pack(header_version, kind, device, seconds, fraction, len(body),
                       _pyigtl_messages.CRC64(body)) + body


register_status_message()
