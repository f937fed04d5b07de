"""rosbag2-compatible MCAP log written without ROS (``mcap`` + ``mcap_ros2``).

The file uses the ``ros2`` profile, ``ros2msg`` schemas and ``cdr`` message
encoding, exactly what the rosbag2 MCAP storage plugin writes, so ``ros2 bag
info/play`` and Foxglove read it. Schemas are the ``.msg`` texts of the type
and, after it, each type it depends on, separated the way rosbag2 does::

    <text of igt_robot_msgs/msg/DoseRecord.msg>
    ================================================================================
    MSG: std_msgs/Header
    <text of Header.msg>
    ================================================================================
    MSG: builtin_interfaces/Time
    ...

The ``.msg`` files are looked up in (first hit wins): the source tree
(``src/<pkg>/msg`` of this repository), ``<sys.prefix>/share/<pkg>/msg`` and every
``$AMENT_PREFIX_PATH/share/<pkg>/msg``. Messages are plain dicts; unknown keys are
refused (``mcap_ros2`` would silently drop them) and missing keys take the ROS
default value.
"""
from __future__ import annotations

import os
import pathlib
import re
import sys
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

PRIMITIVE_TYPES = frozenset({
    'bool', 'byte', 'char', 'float32', 'float64', 'int8', 'uint8', 'int16', 'uint16', 'int32',
    'uint32', 'int64', 'uint64', 'string', 'wstring'})
SEPARATOR = '=' * 80

_REPO_SRC = pathlib.Path(__file__).resolve().parents[3]  # .../src (when run from the source tree)


class McapLogError(Exception):
    """Writing the MCAP log failed; the message names the topic/type/field."""


class MessageDefinitionError(McapLogError):
    """A .msg definition could not be found or parsed."""


def _split_type(type_name: str) -> Tuple[str, str]:
    """'pkg/msg/Name' or 'pkg/Name' -> ('pkg', 'Name')."""
    parts = type_name.strip().split('/')
    if len(parts) == 3 and parts[1] == 'msg':
        return parts[0], parts[2]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise MessageDefinitionError(f'type name {type_name!r} is not of the form pkg/msg/Name')


def _default_search_paths() -> List[pathlib.Path]:
    paths = [_REPO_SRC]  # src/<pkg>/msg/Name.msg
    paths.append(pathlib.Path(sys.prefix) / 'share')
    for prefix in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
        if prefix:
            paths.append(pathlib.Path(prefix) / 'share')
    return paths


_FIELD_RE = re.compile(r'^\s*([A-Za-z_][\w/]*(?:<=\d+)?(?:\[[^\]]*\])?)\s+([A-Za-z_]\w*)\s*(.*)$')


def parse_fields(text: str) -> List[Tuple[str, str]]:
    """(base type, field name) of every field of a .msg text; constants are skipped.

    The base type has array and bound suffixes removed (``float64[]`` -> ``float64``,
    ``string<=10`` -> ``string``).
    """
    fields = []
    for raw in text.splitlines():
        line = raw.split('#', 1)[0].strip()
        if not line:
            continue
        m = _FIELD_RE.match(line)
        if not m:
            raise MessageDefinitionError(f'cannot parse .msg line {raw!r}')
        type_token, name, rest = m.groups()
        if rest.startswith('='):
            continue  # constant: "uint8 INFO=0" (rest holds "=0")
        base = re.sub(r'\[[^\]]*\]$', '', type_token)
        base = re.sub(r'<=\d+$', '', base)
        fields.append((base, name))
    return fields


class MessageDefinitions:
    """Finds .msg files and builds the concatenated ros2msg schema text of a type."""

    def __init__(self, search_paths: Optional[Sequence[os.PathLike]] = None):
        self.search_paths = [pathlib.Path(p) for p in search_paths] if search_paths else _default_search_paths()
        self._cache: Dict[Tuple[str, str], str] = {}

    def msg_text(self, type_name: str) -> str:
        """The raw text of one .msg file."""
        pkg, name = _split_type(type_name)
        key = (pkg, name)
        if key not in self._cache:
            for root in self.search_paths:
                candidate = root / pkg / 'msg' / f'{name}.msg'
                if candidate.is_file():
                    self._cache[key] = candidate.read_text(encoding='utf-8')
                    break
            else:
                raise MessageDefinitionError(
                    f'no {pkg}/msg/{name}.msg in {", ".join(str(p) for p in self.search_paths)}')
        return self._cache[key]

    def _resolve(self, base: str, pkg: str) -> Optional[str]:
        """Field base type -> 'pkg/Name' for complex types, None for primitives."""
        if base in PRIMITIVE_TYPES:
            return None
        if '/' in base:
            p, n = _split_type(base)
            return f'{p}/{n}'
        if base == 'Header':  # ROS 1 shorthand, still accepted by rosidl
            return 'std_msgs/Header'
        return f'{pkg}/{base}'

    def dependencies(self, type_name: str) -> List[str]:
        """All complex types used by ``type_name``, depth-first, each once ('pkg/Name')."""
        pkg, name = _split_type(type_name)
        order: List[str] = []
        seen = {f'{pkg}/{name}'}

        def visit(p: str, n: str):
            for base, _ in parse_fields(self.msg_text(f'{p}/{n}')):
                dep = self._resolve(base, p)
                if dep is None or dep in seen:
                    continue
                seen.add(dep)
                order.append(dep)
                visit(*_split_type(dep))

        visit(pkg, name)
        return order

    def schema_text(self, type_name: str) -> str:
        """The ros2msg schema: the type's text then ``===``/``MSG:`` blocks for each dependency."""
        parts = [self.msg_text(type_name).rstrip('\n')]
        for dep in self.dependencies(type_name):
            parts.append(f'{SEPARATOR}\nMSG: {dep}\n{self.msg_text(dep).rstrip(chr(10))}')
        return '\n'.join(parts) + '\n'

    def field_table(self, type_name: str) -> Dict[str, Dict[str, Optional[str]]]:
        """{'pkg/Name': {field: complex type or None}} for the type and its dependencies."""
        pkg, name = _split_type(type_name)
        table = {}
        for t in [f'{pkg}/{name}'] + self.dependencies(type_name):
            p, _ = _split_type(t)
            table[t] = {field: self._resolve(base, p) for base, field in parse_fields(self.msg_text(t))}
        return table


def _check_keys(message: Any, type_key: str, table, path: str) -> None:
    """Refuse keys that are not fields (a typo would otherwise be dropped silently)."""
    if not isinstance(message, Mapping):
        return  # objects with attributes are accepted as-is by mcap_ros2
    fields = table[type_key]
    for key, value in message.items():
        if key not in fields:
            raise McapLogError(f'{path}: unknown field {key!r} for {type_key} '
                               f'(fields: {", ".join(fields)})')
        sub = fields[key]
        if sub is None or value is None:
            continue
        if isinstance(value, Mapping):
            _check_keys(value, sub, table, f'{path}.{key}')
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                _check_keys(item, sub, table, f'{path}.{key}[{i}]')


def _normalise_type(type_name: str) -> str:
    pkg, name = _split_type(type_name)
    return f'{pkg}/msg/{name}'


class McapLog:
    """Append ROS 2 messages (given as dicts) to a new MCAP file.

    ``write(topic, type_name, message_dict, log_time_ns)``: ``type_name`` like
    ``igt_robot_msgs/msg/DoseRecord``; ``log_time_ns`` integer nanoseconds since the
    UNIX epoch (rosbag2 convention). A topic keeps the type of its first message.
    Thread-safe. ``close()`` writes the summary section; a file not closed is
    still readable by MCAP's recovery tools up to its last complete chunk.
    """

    def __init__(self, path, *, definitions: Optional[MessageDefinitions] = None,
                 compression: str = 'zstd', chunk_size: int = 1024 * 1024):
        from mcap.writer import CompressionType
        from mcap_ros2.writer import Writer
        kinds = {'zstd': CompressionType.ZSTD, 'lz4': CompressionType.LZ4, 'none': CompressionType.NONE}
        if compression not in kinds:
            raise McapLogError(f'compression must be one of {", ".join(kinds)}, got {compression!r}')
        self.path = os.fspath(path)
        self.definitions = definitions or MessageDefinitions()
        self._lock = threading.Lock()
        self._file = open(self.path, 'wb')
        try:
            self._writer = Writer(self._file, chunk_size=chunk_size, compression=kinds[compression])
        except Exception:
            self._file.close()
            raise
        self._schemas: Dict[str, Any] = {}
        self._tables: Dict[str, Any] = {}
        self._topic_types: Dict[str, str] = {}
        self._sequence: Dict[str, int] = {}
        self.message_count = 0
        self.flushed_count = 0

    def _schema(self, type_name: str):
        if type_name not in self._schemas:
            text = self.definitions.schema_text(type_name)
            self._tables[type_name] = self.definitions.field_table(type_name)
            self._schemas[type_name] = self._writer.register_msgdef(type_name, text)
        return self._schemas[type_name]

    def write(self, topic: str, type_name: str, message: Mapping[str, Any], log_time_ns: int) -> None:
        """Encode ``message`` as CDR with the schema of ``type_name`` and append it."""
        if not isinstance(topic, str) or not topic.startswith('/') or len(topic) < 2:
            raise McapLogError(f'topic must be an absolute ROS name like "/procedure/events", got {topic!r}')
        if isinstance(log_time_ns, bool) or not isinstance(log_time_ns, int) or log_time_ns < 0:
            raise McapLogError(f'log_time_ns must be a non-negative int (ns since epoch), got {log_time_ns!r}')
        type_name = _normalise_type(type_name)
        with self._lock:
            if self._file is None:
                raise McapLogError(f'{self.path} is closed')
            known = self._topic_types.get(topic)
            if known is not None and known != type_name:
                raise McapLogError(f'topic {topic} already carries {known}, not {type_name}')
            schema = self._schema(type_name)
            pkg, name = _split_type(type_name)
            _check_keys(message, f'{pkg}/{name}', self._tables[type_name], topic)
            seq = self._sequence.get(topic, 0)
            try:
                self._writer.write_message(topic=topic, schema=schema, message=message,
                                           log_time=log_time_ns, publish_time=log_time_ns, sequence=seq)
            except McapLogError:
                raise
            except Exception as exc:  # CDR encoding: wrong value types
                raise McapLogError(f'{topic} ({type_name}): cannot encode message: {exc}') from exc
            self._topic_types[topic] = type_name
            self._sequence[topic] = seq + 1
            self.message_count += 1

    def flush(self, fsync: bool = True) -> None:
        """Close the chunk in progress and write it out (and fsync): a crash after this loses nothing before it."""
        with self._lock:
            if self._file is None:
                return
            self._writer._writer.flush()
            if fsync:
                os.fsync(self._file.fileno())
            self.flushed_count = self.message_count

    def close(self) -> None:
        """Finish the MCAP (summary, footer) and close the file; idempotent."""
        with self._lock:
            if self._file is None:
                return
            try:
                self._writer.finish()
            finally:
                self._file.close()
                self._file = None

    def __enter__(self) -> 'McapLog':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


MCAP_MAGIC = b'\x89MCAP0\r\n'


def mcap_file_status(path) -> Dict[str, Any]:
    """What an MCAP file holds: finalised (footer written) or not, readable messages, last log time.

    For a file not finalised (its writer was killed) every complete chunk is read; what was still
    buffered in the writer's open chunk is lost and counted nowhere (the report says so).
    """
    from mcap.records import Message
    from mcap.stream_reader import StreamReader
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        if size >= len(MCAP_MAGIC):
            f.seek(size - len(MCAP_MAGIC))
            finalised = f.read() == MCAP_MAGIC and size > 2 * len(MCAP_MAGIC)
        else:
            finalised = False
        f.seek(0)
        messages, last_ns, error = 0, None, ''
        try:
            # Read forward record by record: an unfinished file has no summary to seek to.
            for message in StreamReader(f, skip_magic=False).records:
                if not isinstance(message, Message):
                    continue
                messages += 1
                last_ns = message.log_time if last_ns is None else max(last_ns, message.log_time)
        except Exception as exc:  # noqa: BLE001 -- a truncated file ends the readable part
            error = f'{type(exc).__name__}: {exc}'
    return {'path': path, 'bytes': size, 'finalised': finalised, 'messages': messages,
            'last_log_time_ns': last_ns, 'read_error': error}
