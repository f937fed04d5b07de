"""Pure helpers of the procedure: insertion schedule and tip checks (no rclpy)."""
from __future__ import annotations

import dataclasses
import math
from typing import List

import numpy as np


def insertion_schedule(full_depth: float, steps: int) -> List[float]:
    """Absolute insertion depths (m) of ``steps`` equal steps ending at ``full_depth``."""
    if not (math.isfinite(full_depth) and full_depth > 0.0):
        raise ValueError(f'full insertion depth must be finite and > 0 m, got {full_depth!r}')
    if int(steps) < 1:
        raise ValueError(f'need at least one insertion step, got {steps!r}')
    return [full_depth * (k + 1) / int(steps) for k in range(int(steps))]


@dataclasses.dataclass(frozen=True)
class TipCheck:
    """A needle tip found in an image, compared with the target (scanner LPS, m)."""

    tip: np.ndarray
    target: np.ndarray
    direction: np.ndarray          # planned direction (unit), entry -> target

    @property
    def error(self) -> float:
        """Tip-to-target distance (m)."""
        return float(np.linalg.norm(self.tip - self.target))

    @property
    def depth_error(self) -> float:
        """Signed error along the planned path (m): negative = short of the target."""
        return float((self.tip - self.target) @ self.direction)

    @property
    def lateral_error(self) -> float:
        """Distance of the tip from the planned line (m)."""
        offset = self.tip - self.target
        return float(np.linalg.norm(offset - (offset @ self.direction) * self.direction))

    def describe(self) -> str:
        return (f'tip {self.error * 1e3:.2f} mm from target (depth {self.depth_error * 1e3:+.2f} mm, '
                f'lateral {self.lateral_error * 1e3:.2f} mm)')
