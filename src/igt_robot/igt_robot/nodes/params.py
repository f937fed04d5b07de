"""Declare ROS parameters with a description and a range, read them back as a plain dict.

Every node lists its parameters as :class:`Param` entries; this module turns them
into ``declare_parameter`` calls with ``ParameterDescriptor`` (description,
floating/integer range, read-only flag), so ``ros2 param describe`` explains each.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    default: Any
    description: str
    low: Optional[float] = None       # inclusive range for numbers
    high: Optional[float] = None
    read_only: bool = False
    choices: Sequence[str] = ()       # allowed values for strings (checked on declare)


def declare(node, params: Sequence[Param]) -> dict:
    """Declare ``params`` on ``node`` and return their values by name; bad values raise ValueError."""
    values = {}
    for p in params:
        descriptor = ParameterDescriptor(description=p.description, read_only=p.read_only)
        if p.choices:
            descriptor.additional_constraints = 'one of: ' + ', '.join(p.choices)
        if p.low is not None and p.high is not None:
            if isinstance(p.default, bool):
                pass
            elif isinstance(p.default, int):
                descriptor.integer_range = [IntegerRange(from_value=int(p.low), to_value=int(p.high), step=0)]
            elif isinstance(p.default, float):
                descriptor.floating_point_range = [FloatingPointRange(from_value=float(p.low),
                                                                      to_value=float(p.high), step=0.0)]
        value = node.declare_parameter(p.name, p.default, descriptor).value
        if p.choices and value not in p.choices:
            raise ValueError(f"parameter '{p.name}' = {value!r} is not one of {list(p.choices)}")
        values[p.name] = value
    return values
