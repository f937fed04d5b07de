"""Geometry of the 7-rod Z-frame fiducial (shared by the phantom and the registration).

All coordinates are in the ``zframe`` frame, metres. The frame is a 60 mm cube
centred at the zframe origin; the rods are thin tubes filled with a material
that is bright in both CT (contrast / dense polymer) and MR (contrast gel).

Layout (looking down the frame's +z axis; x to the right, y up)::

        rod3 ----- rod4 (diag, face y=+s) ----- rod5
         |                                       |
     rod2 (diag, face x=-s)            rod6 (diag, face x=+s)
         |                                       |
        rod1          (open face y=-s)          rod7

* Rods 1, 3, 5, 7 run parallel to +z through the cube's corners
  (x, y) = (-s,-s), (-s,+s), (+s,+s), (+s,-s), z in [-s, +s], s = 30 mm.
* Rods 2, 4, 6 are the diagonals of three faces. Each spans z in [-s, +s]
  while its in-face coordinate goes from -d to +d (d = 22 mm), so its ends stay
  s - d = 8 mm away from the corner rods (separate blobs in the image):

  - rod 2 on face x = -s:  y = +d z / s
  - rod 4 on face y = +s:  x = +d z / s
  - rod 6 on face x = +s:  y = +d z / s

  Rods 2 and 6 slope the *same* way. With the open face this makes the rod set
  free of any rigid self-symmetry (mirror-image slopes on opposite faces would
  be invariant under a 180 deg turn about y and make the pose ambiguous).

A slice crossing the frame shows 7 dots; the position of each diagonal's dot
between its two corner dots encodes where along z the slice is -- the classic
Z-frame principle. This module only states the geometry; registration lives in
:mod:`igt_robot.imaging.zframe`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from igt_robot import frames, units

ZFRAME_HALF_SIDE_M = units.mm_to_m(30.0)
ZFRAME_DIAGONAL_HALF_SPAN_M = units.mm_to_m(22.0)
ZFRAME_ROD_RADIUS_M = units.mm_to_m(2.0)


@dataclasses.dataclass(frozen=True)
class ZFrameRod:
    """One rod: a straight tube from ``start`` to ``end`` (zframe frame, m)."""

    number: int
    start: tuple
    end: tuple
    diagonal: bool

    @property
    def start_array(self):
        return np.array(self.start, dtype=float)

    @property
    def end_array(self):
        return np.array(self.end, dtype=float)

    @property
    def direction(self):
        """Unit vector from start to end (zframe frame)."""
        d = self.end_array - self.start_array
        return d / np.linalg.norm(d)

    @property
    def length(self):
        return float(np.linalg.norm(self.end_array - self.start_array))


def _build_rods():
    s = ZFRAME_HALF_SIDE_M
    d = ZFRAME_DIAGONAL_HALF_SPAN_M
    return (
        ZFrameRod(1, (-s, -s, -s), (-s, -s, s), False),
        ZFrameRod(2, (-s, -d, -s), (-s, d, s), True),
        ZFrameRod(3, (-s, s, -s), (-s, s, s), False),
        ZFrameRod(4, (-d, s, -s), (d, s, s), True),
        ZFrameRod(5, (s, s, -s), (s, s, s), False),
        ZFrameRod(6, (s, -d, -s), (s, d, s), True),
        ZFrameRod(7, (s, -s, -s), (s, -s, s), False),
    )


ZFRAME_RODS = _build_rods()


def rod_segments_in(T_frame_zframe, rods=ZFRAME_RODS):
    """Rod end points mapped into another frame: array (7, 2, 3) in metres."""
    return np.stack([frames.apply(T_frame_zframe, np.stack([r.start_array, r.end_array]))
                     for r in rods])
