"""Generic ROS message <-> plain Python conversion (rosidl_runtime_py is not a dependency).

:func:`to_dict` walks ``get_fields_and_field_types()`` of any generated message
class recursively and returns JSON-friendly values: nested messages become
dicts, sequences and fixed arrays (``array.array``, numpy) become lists, numpy
scalars become Python numbers and ``octet``/``byte`` values become ints. The
result has exactly the field names of the ``.msg`` file, so it can be passed to
:class:`igt_robot.record.McapLog` (CDR encoding by schema) or stored as JSON.

:func:`from_dict` is the inverse for a known message class (unknown keys are
refused, naming the field, rather than silently dropped).

Small helpers used by several nodes: :func:`stamp_ns`, :func:`key_values_dict`,
:func:`point_list`, :func:`transform_matrix` (and its inverse :func:`transform_from_matrix`),
:func:`pose_matrix`.
"""
from __future__ import annotations

import array
from typing import Any, Dict, Mapping

import numpy as np
from geometry_msgs.msg import Quaternion, Transform, Vector3

from igt_robot import frames


def is_message(value: Any) -> bool:
    """True for an instance of a generated ROS message class."""
    return hasattr(type(value), 'get_fields_and_field_types') and not isinstance(value, type)


def _convert(value: Any) -> Any:
    if is_message(value):
        return to_dict(value)
    if isinstance(value, (bytes, bytearray)):
        # rclpy hands a single 'octet'/'byte' field as bytes of length 1.
        return value[0] if len(value) == 1 else list(value)
    if isinstance(value, (list, tuple, array.array)):
        return [_convert(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_convert(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def to_dict(msg) -> Dict[str, Any]:
    """All fields of ``msg`` (recursively) as a plain dict; field names as in the .msg file."""
    if not is_message(msg):
        raise TypeError(f'expected a ROS message, got {type(msg).__name__}')
    return {name: _convert(getattr(msg, name)) for name in type(msg).get_fields_and_field_types()}


def _nested_type(msg_cls, field: str):
    """Class of a nested message field (or of the elements of a sequence/array of messages), else None."""
    sample = getattr(msg_cls(), field)
    if is_message(sample):
        return type(sample)
    # Sequences of messages start empty; the class comes from the SLOT_TYPES introspection.
    slot_types = getattr(msg_cls, 'SLOT_TYPES', ())
    names = list(msg_cls.get_fields_and_field_types())
    if field in names and slot_types:
        slot = slot_types[names.index(field)]
        inner = getattr(slot, 'value_type', None)
        namespaces = getattr(inner, 'namespaces', None)
        if inner is not None and namespaces:
            import importlib
            module = importlib.import_module('.'.join(namespaces))
            return getattr(module, inner.name)
    return None


def from_dict(msg_cls, data: Mapping[str, Any]):
    """Build a ``msg_cls`` instance from a dict made by :func:`to_dict` (missing keys keep defaults)."""
    if not isinstance(data, Mapping):
        raise TypeError(f'{msg_cls.__name__}: expected a mapping, got {type(data).__name__}')
    fields = msg_cls.get_fields_and_field_types()
    msg = msg_cls()
    for key, value in data.items():
        if key not in fields:
            raise KeyError(f'{msg_cls.__name__} has no field {key!r} (fields: {", ".join(fields)})')
        nested = _nested_type(msg_cls, key)
        if nested is not None and isinstance(value, Mapping):
            value = from_dict(nested, value)
        elif nested is not None and isinstance(value, (list, tuple)):
            value = [from_dict(nested, v) if isinstance(v, Mapping) else v for v in value]
        elif fields[key] in ('octet', 'byte') and isinstance(value, int):
            value = bytes([value])
        setattr(msg, key, value)
    return msg


# ------------------------------------------------------------------ small helpers

def stamp_ns(stamp) -> int:
    """A ``builtin_interfaces/Time`` as integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def key_values_dict(values) -> Dict[str, str]:
    """``diagnostic_msgs/KeyValue[]`` -> {key: value} (later duplicates win)."""
    return {kv.key: kv.value for kv in values}


def point_list(point) -> list:
    """geometry_msgs Point/Vector3 -> [x, y, z]."""
    return [float(point.x), float(point.y), float(point.z)]


def transform_matrix(transform) -> np.ndarray:
    """geometry_msgs/Transform -> 4x4 (maps child-frame points into the header frame)."""
    q = transform.rotation
    t = transform.translation
    return frames.make_transform(frames.rotation_from_quaternion_xyzw([q.x, q.y, q.z, q.w]), [t.x, t.y, t.z])


def transform_from_matrix(matrix):
    """4x4 -> geometry_msgs/Transform (the inverse of :func:`transform_matrix`)."""
    m = np.asarray(matrix, dtype=float)
    x, y, z, w = frames.quaternion_xyzw(m[:3, :3])
    return Transform(translation=Vector3(x=float(m[0, 3]), y=float(m[1, 3]), z=float(m[2, 3])),
                     rotation=Quaternion(x=float(x), y=float(y), z=float(z), w=float(w)))


def pose_matrix(pose) -> np.ndarray:
    """geometry_msgs/Pose -> 4x4 (the pose's frame expressed in the parent frame)."""
    q = pose.orientation
    p = pose.position
    return frames.make_transform(frames.rotation_from_quaternion_xyzw([q.x, q.y, q.z, q.w]), [p.x, p.y, p.z])
