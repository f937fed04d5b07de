"""Image input of a registration (no ROS): where the image is, what it is, and reading it.

* :func:`resolve_image_path` -- the absolute location of a requested DICOM folder or NIfTI file,
  confined to an ``image_root`` when one is configured (``..`` and symlinks resolved first);
* :func:`load_volume` -- a DICOM series folder or a NIfTI file as a :class:`Volume` (scanner LPS, m),
  every refusal an :class:`ImageError` that names the problem;
* :func:`guess_modality` -- CT or MR for a NIfTI file, which carries no modality;
* :func:`parse_marker_positions` -- custom fiducial marker centres from a flat parameter list.

registration_node calls these; they are unit-tested without a ROS graph.
"""
from __future__ import annotations

import itertools
import os
import pathlib
from typing import Sequence

import numpy as np

from igt_robot.imaging.errors import ImageError
from igt_robot.imaging.fiducials import is_collinear
from igt_robot.imaging.io import read_dicom_series, read_nifti
from igt_robot.imaging.volume import Volume

NIFTI_SUFFIXES = ('.nii', '.nii.gz')
# A NIfTI file carries no modality. CT in HU has air at -1000 in any field of view that
# holds the (external) Z-frame; MR magnitude images are never negative. So a clearly
# negative 1st percentile means CT.
CT_GUESS_PERCENTILE = 1.0
CT_GUESS_BELOW_HU = -200.0
# A DICOM series folder holds one file per slice (a few thousand at most); far more means a wrong folder.
MAX_FOLDER_FILES = 10000
# Custom marker coordinates farther than this from the zframe origin are a unit mistake (mm given as m).
MAX_MARKER_DISTANCE_M = 0.5


def resolve_image_path(image_path: str, image_root: str = '') -> pathlib.Path:
    """The absolute, normalised location named by ``image_path``; raises :class:`ImageError`.

    Relative paths are taken relative to ``image_root`` (or the working folder when
    it is empty). ``..`` and symlinks are resolved *before* the ``image_root``
    check, so neither can lead outside it.
    """
    text = (image_path or '').strip()
    if not text:
        raise ImageError('image_path is empty: give a DICOM series folder or a NIfTI file (.nii / .nii.gz)')
    if '\x00' in text:
        raise ImageError('image_path contains a NUL character')
    root = pathlib.Path(os.path.expanduser(image_root)).resolve() if image_root else None
    path = pathlib.Path(os.path.expanduser(text))
    if not path.is_absolute():
        path = (root if root is not None else pathlib.Path.cwd()) / path
    path = path.resolve()
    if root is not None and not path.is_relative_to(root):
        raise ImageError(f'image_path {text!r} resolves to {path}, outside image_root {root}')
    if not path.exists():
        raise ImageError(f'image_path {path} does not exist')
    return path


def _is_nifti(path: pathlib.Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def guess_modality(data: np.ndarray) -> str:
    """'CT' when the intensities look like Hounsfield units (air present), else 'MR'."""
    finite = np.asarray(data)[np.isfinite(data)]
    if finite.size == 0:
        return 'CT'   # any choice; the NaN check refuses the volume
    return 'CT' if float(np.percentile(finite, CT_GUESS_PERCENTILE)) < CT_GUESS_BELOW_HU else 'MR'


def load_volume(path: pathlib.Path, nifti_modality: str = 'auto') -> Volume:
    """Read a DICOM series folder or a NIfTI file into a :class:`Volume` (scanner LPS, m).

    Raises :class:`ImageError` naming the problem: empty folder, folder without
    DICOM images, inconsistent series, single DICOM file, unreadable or corrupt
    file, unsupported file type, zero spacing.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        # Bounded listing: a request for '/' or a whole archive must not crawl the disk.
        files = list(itertools.islice((p for p in path.rglob('*') if p.is_file()), MAX_FOLDER_FILES + 1))
        if not files:
            raise ImageError(f'folder {path} is empty: no DICOM series to register')
        if len(files) > MAX_FOLDER_FILES:
            raise ImageError(f'folder {path} holds more than {MAX_FOLDER_FILES} files; give the folder of '
                             f'one DICOM series')
        try:
            return read_dicom_series(path)
        except ImageError as exc:
            nifti = sorted(p.name for p in files if _is_nifti(p))
            if nifti and 'no DICOM images' in str(exc):
                raise ImageError(f'folder {path} is not a DICOM series folder (it holds NIfTI file(s) '
                                 f'{", ".join(nifti[:3])}: give the file path instead)') from exc
            raise
    if not path.is_file():
        raise ImageError(f'{path} is neither a regular file nor a folder')
    if not os.access(path, os.R_OK):
        raise ImageError(f'image file {path} is not readable (permission denied)')
    if _is_nifti(path):
        if path.stat().st_size == 0:
            raise ImageError(f'NIfTI file {path} is empty (0 bytes)')
        try:
            volume = read_nifti(path, 'CT')
        except ImageError:
            raise
        except Exception as exc:   # truncated gzip, bad header fields: nibabel/zlib raise many types
            raise ImageError(f'cannot read NIfTI file {path}: {type(exc).__name__}: {exc}') from exc
        if nifti_modality == 'auto':
            volume.modality = guess_modality(volume.data)
            volume.metadata['modality_source'] = 'guessed from the intensities'
        else:
            volume.modality = nifti_modality
        return volume
    if path.name.lower().endswith('.dcm') or _has_dicom_preamble(path):
        raise ImageError(f'{path} is a single DICOM file; give the folder holding the whole series')
    raise ImageError(f'unsupported image file {path.name}: expected a DICOM series folder or a NIfTI file '
                     f'(.nii / .nii.gz)')


def _has_dicom_preamble(path: pathlib.Path) -> bool:
    try:
        with open(path, 'rb') as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b'DICM'


def parse_marker_positions(values: Sequence[float]) -> np.ndarray:
    """Flat [x1, y1, z1, ...] (zframe frame, m) -> (N, 3); ValueError naming the problem."""
    flat = np.asarray(list(values), dtype=float)
    if flat.size % 3 or flat.size < 9:
        raise ValueError(f'fiducials.custom_positions_m needs 3 values per marker and >= 3 markers, '
                         f'got {flat.size} value(s)')
    points = flat.reshape(-1, 3)
    if not np.all(np.isfinite(points)):
        raise ValueError('fiducials.custom_positions_m holds NaN/infinite values')
    far = float(np.max(np.linalg.norm(points, axis=1)))
    if far > MAX_MARKER_DISTANCE_M:
        raise ValueError(f'fiducials.custom_positions_m: a marker is {far:g} m from the zframe origin '
                         f'(> {MAX_MARKER_DISTANCE_M} m); positions are in metres, not millimetres')
    if is_collinear(points):
        raise ValueError('fiducials.custom_positions_m: the markers are (nearly) collinear; the pose would '
                         'be undetermined')
    return points
