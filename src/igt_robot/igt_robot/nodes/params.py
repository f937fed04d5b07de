"""Declare ROS parameters with a description and a range, read them back as a plain dict.

Every node lists its parameters as :class:`Param` entries; this module turns them
into ``declare_parameter`` calls with ``ParameterDescriptor`` (description,
floating/integer range, read-only flag), so ``ros2 param describe`` explains each.

Parameters never lie (docs/safety.md): a node that declares with ``read_only=True`` makes every
parameter read-only (``set_parameters`` is refused by rclpy with the reason) except those marked
``live=True``; :func:`apply_live` then validates a change of a live parameter and applies it through the
node's own function before it is accepted, so the value reported is always the value in force.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    default: Any
    description: str
    low: Optional[float] = None       # inclusive range for numbers
    high: Optional[float] = None
    read_only: bool = False
    choices: Sequence[str] = ()       # allowed values for strings (checked on declare)
    live: bool = False                # applied at run time by the node (see apply_live)


def declare(node, params: Sequence[Param], read_only: bool = False) -> dict:
    """Declare ``params`` on ``node`` and return their values by name; bad values raise ValueError.

    ``read_only``: every parameter not marked ``live`` is read-only (start-up values only).
    """
    values = {}
    for p in params:
        descriptor = ParameterDescriptor(description=p.description,
                                         read_only=p.read_only or (read_only and not p.live))
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


def check_value(p: Param, value) -> Optional[str]:
    """Why ``value`` is not acceptable for ``p`` (None: it is)."""
    if p.choices and value not in p.choices:
        return f"parameter '{p.name}' = {value!r} is not one of {list(p.choices)}"
    if p.low is not None and p.high is not None and isinstance(value, (int, float)) \
            and not isinstance(value, bool) and not (p.low <= value <= p.high):
        return f"parameter '{p.name}' = {value!r} is outside [{p.low:g}, {p.high:g}]"
    return None


def apply_live(node, params: Sequence[Param], apply: Callable[[str, Any], None]) -> None:
    """Accept a change of a ``live`` parameter only once ``apply(name, value)`` has put it in force.

    ``apply`` raises ValueError (its message is the refusal reason) for a value the node cannot use.
    A change of any other parameter of ``params`` is refused (belt and braces beside read-only).
    """
    by_name = {p.name: p for p in params}

    def on_set(changes):
        for change in changes:
            p = by_name.get(change.name)
            if p is None:
                continue
            if not p.live:
                return SetParametersResult(successful=False,
                                           reason=f"parameter '{p.name}' is fixed at start-up (read-only)")
            problem = check_value(p, change.value)
            if problem:
                return SetParametersResult(successful=False, reason=problem)
        for change in changes:
            if change.name in by_name:
                try:
                    apply(change.name, change.value)
                except ValueError as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)
    node.add_on_set_parameters_callback(on_set)
