"""The one BENCH line format every benchmark prints (see DEVELOPERS.md).

    BENCH name=<id> value=<number> unit=<unit> target=<op><number> status=MET|MISSED
"""
import operator

import numpy as np

_OPS = {'<=': operator.le, '<': operator.lt, '>=': operator.ge, '>': operator.gt}


def report(name: str, value: float, unit: str, op: str, target: float) -> bool:
    """Print one BENCH line; return whether the target was met. NaN never meets a target."""
    met = bool(np.isfinite(value)) and _OPS[op](value, target)
    print(f'BENCH name={name} value={value:.6g} unit={unit} target={op}{target:g} status={"MET" if met else "MISSED"}',
          flush=True)
    return met


def info(name: str, value: float, unit: str) -> None:
    """A figure with no target (context for the reader): a comment line, not a BENCH line."""
    print(f'# {name} = {value:.6g} {unit}', flush=True)


def percentiles(samples, qs=(50, 99)):
    a = np.asarray(samples, dtype=float)
    return [float(np.percentile(a, q)) for q in qs] + [float(a.max())]
