"""Reading and writing volumes: DICOM series, NIfTI, OpenIGTLink IMAGE messages.

Frames at each boundary (the core always holds scanner LPS, metres):

* DICOM: patient coordinates are LPS, millimetres -> only mm->m conversion.
* NIfTI: the qform/sform maps voxel indices to **RAS** mm -> flip x and y
  (:data:`igt_robot.frames.LPS_TO_RAS`) and convert mm->m.
* OpenIGTLink IMAGE: the header says RAS (1) or LPS (2); 3D Slicer sends RAS.
  The matrix is mm. We honour the header, and write RAS like Slicer expects.

All conversions between mm and m go through :mod:`igt_robot.units`.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional

import numpy as np

from igt_robot import frames, units
from igt_robot.imaging.errors import ImageError
from igt_robot.imaging.volume import Volume, affine_m_to_mm, affine_mm_to_m, make_affine

# Geometry tolerances when checking a DICOM series for consistency.
_ORIENTATION_TOL = 1e-4        # direction cosine difference between slices
_SPACING_REL_TOL = 0.01        # relative spread of slice spacing (1 %)
_PIXEL_SPACING_TOL_MM = 1e-4

CT_IMAGE_STORAGE = '1.2.840.10008.5.1.4.1.1.2'
MR_IMAGE_STORAGE = '1.2.840.10008.5.1.4.1.1.4'
CT_RESCALE_INTERCEPT = -1024.0


# ============================================================================ NIfTI
def read_nifti(path, modality='CT') -> Volume:
    """Read a NIfTI-1/2 file into a :class:`Volume` (LPS metres).

    The file's sform (or qform) maps (i, j, k) to RAS mm; it is converted to
    LPS m. The data array is transposed from NIfTI's [i, j, k] to [k, j, i].
    """
    import nibabel as nib
    try:
        image = nib.load(str(path))
    except Exception as exc:   # nibabel raises several unrelated types
        raise ImageError(f'cannot read NIfTI file {path}: {exc}') from exc
    data = np.asarray(image.dataobj)    # the array proxy applies scl_slope / scl_inter
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImageError(f'NIfTI file {path} holds a {data.ndim}-D image, expected 3-D')
    affine_ras_mm = image.affine
    if affine_ras_mm is None or not np.all(np.isfinite(affine_ras_mm)):
        raise ImageError(f'NIfTI file {path} has no valid orientation (sform/qform)')
    affine_lps_mm = frames.LPS_TO_RAS @ np.asarray(affine_ras_mm, float)   # RAS -> LPS: same flip
    volume = Volume(np.ascontiguousarray(np.transpose(data, (2, 1, 0))), affine_mm_to_m(affine_lps_mm),
                    modality, {'source': str(path)})
    return volume


def write_nifti(volume: Volume, path):
    """Write a :class:`Volume` as NIfTI-1 with sform = qform (scanner, RAS mm)."""
    import nibabel as nib
    affine_ras_mm = frames.LPS_TO_RAS @ affine_m_to_mm(volume.affine)
    data = np.ascontiguousarray(np.transpose(volume.data, (2, 1, 0)))
    image = nib.Nifti1Image(data, affine_ras_mm)
    image.set_sform(affine_ras_mm, code=1)     # 1 = scanner anatomical coordinates
    image.set_qform(affine_ras_mm, code=1)
    image.header.set_xyzt_units(xyz='mm', t='sec')
    nib.save(image, str(path))


# ============================================================================ DICOM
def _dicom_files(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f'DICOM folder {folder} does not exist')
    return sorted(p for p in folder.rglob('*') if p.is_file())


def read_dicom_series(folder, series_instance_uid: Optional[str] = None) -> Volume:
    """Read one DICOM image series from a folder into a :class:`Volume`.

    Files that are not DICOM, or DICOM without patient geometry, are skipped; the
    rest go through :func:`volume_from_datasets` (its checks apply).
    """
    import pydicom
    files = _dicom_files(folder)
    datasets = []
    for path in files:
        try:
            ds = pydicom.dcmread(str(path), defer_size='1 KB')   # pixel data read on use
        except Exception:      # not a DICOM file (e.g. DICOMDIR companions, notes): skip
            continue
        if 'ImagePositionPatient' not in ds or 'ImageOrientationPatient' not in ds:
            continue
        datasets.append(ds)
    if not datasets:
        raise ImageError(f'no DICOM images with patient geometry found in {folder}')
    return volume_from_datasets(datasets, series_instance_uid, source=str(folder))


def _instance_name(ds) -> str:
    """How an instance is named in a message: its file name, else its instance number and UID."""
    filename = getattr(ds, 'filename', None)
    if isinstance(filename, (str, Path)) and str(filename):
        return Path(filename).name
    return f'instance {getattr(ds, "InstanceNumber", "?")} ({getattr(ds, "SOPInstanceUID", "no UID")})'


_NATIVE_LITTLE_ENDIAN = ('1.2.840.10008.1.2', '1.2.840.10008.1.2.1')     # Implicit / Explicit VR Little Endian


def _native_pixels(ds) -> Optional[np.ndarray]:
    """The stored values of an uncompressed little-endian single-frame greyscale image, read straight from its
    bytes (a tenth of the time of pydicom's general decoder, which the scanner's ~200 slices/s need); unused
    high bits masked (unsigned) or sign-extended (signed) as pydicom does. None for anything else: pydicom
    decodes it (or says why it cannot)."""
    meta = getattr(ds, 'file_meta', None)
    try:
        if (str(getattr(meta, 'TransferSyntaxUID', '')) not in _NATIVE_LITTLE_ENDIAN
                or int(ds.SamplesPerPixel) != 1 or int(getattr(ds, 'NumberOfFrames', 1) or 1) != 1):
            return None
        allocated, stored, signed = int(ds.BitsAllocated), int(ds.BitsStored), int(ds.PixelRepresentation) == 1
        rows, columns = int(ds.Rows), int(ds.Columns)
        data = ds.PixelData
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if allocated not in (8, 16, 32) or not 0 < stored <= allocated or not isinstance(data, bytes):
        return None
    dtype = np.dtype(f'<{"i" if signed else "u"}{allocated // 8}')
    if len(data) < rows * columns * dtype.itemsize:
        return None
    pixels = np.frombuffer(data, dtype, rows * columns).reshape(rows, columns)
    unused = allocated - stored
    if unused and signed:
        pixels = (pixels << unused) >> unused           # sign extension from the highest stored bit
    elif unused:
        pixels = pixels & dtype.type((1 << stored) - 1)
    return pixels


def decode_slice(ds) -> np.ndarray:
    """One image's stored values -> float32 real-world values (RescaleSlope/Intercept; CT -> HU)."""
    pixels = _native_pixels(ds)
    if pixels is None:
        try:
            pixels = ds.pixel_array
        except Exception as exc:
            raise ImageError(f'cannot decode pixel data of {_instance_name(ds)}: {exc}') from exc
    slope = float(getattr(ds, 'RescaleSlope', 1.0) or 1.0)
    intercept = float(getattr(ds, 'RescaleIntercept', 0.0) or 0.0)
    out = pixels.astype(np.float32)         # a plain cast: several times faster than a casting multiply
    if slope != 1.0:
        out *= np.float32(slope)
    out += np.float32(intercept)
    return out


def volume_from_datasets(datasets, series_instance_uid: Optional[str] = None, source: str = 'memory',
                         decoded: Optional[dict] = None) -> Volume:
    """Assemble one DICOM image series held in memory (pydicom datasets) into a :class:`Volume`.

    This is where a series received over the network becomes a volume without a
    round trip through the disk. Checks (each failure raises :class:`ImageError`
    naming the problem): a single SeriesInstanceUID (or the one requested), one
    orientation, one pixel spacing and matrix size, no duplicate and no missing
    slice (uniform spacing along the slice normal), non-zero spacing. Values are
    rescaled with RescaleSlope/Intercept (CT -> HU). ``decoded`` (SOPInstanceUID ->
    slice from :func:`decode_slice`) holds slices decoded as they arrived.
    """
    decoded = decoded or {}
    headers = [ds for ds in datasets if 'ImagePositionPatient' in ds and 'ImageOrientationPatient' in ds]
    if not headers:
        raise ImageError(f'no DICOM images with patient geometry in {source}')
    uids = sorted({str(ds.SeriesInstanceUID) for ds in headers})
    if series_instance_uid is None:
        if len(uids) > 1:
            raise ImageError(f'{source} holds {len(uids)} series ({", ".join(uids)}); '
                             'pass series_instance_uid to choose one')
        series_instance_uid = uids[0]
    headers = [ds for ds in headers if str(ds.SeriesInstanceUID) == series_instance_uid]
    if not headers:
        raise ImageError(f'series {series_instance_uid} not found in {source}')
    if len(headers) < 2:
        raise ImageError(f'series {series_instance_uid} has a single slice; a volume needs at least 2')

    first = headers[0]
    iop0 = np.array(first.ImageOrientationPatient, float)
    ps0 = np.array(first.PixelSpacing, float)
    rows0, cols0 = int(first.Rows), int(first.Columns)
    for ds in headers:
        iop = np.array(ds.ImageOrientationPatient, float)
        if np.max(np.abs(iop - iop0)) > _ORIENTATION_TOL:
            raise ImageError(f'inconsistent series: {_instance_name(ds)} has orientation {iop.round(4).tolist()}, '
                             f'expected {iop0.round(4).tolist()}')
        ps = np.array(ds.PixelSpacing, float)
        if np.max(np.abs(ps - ps0)) > _PIXEL_SPACING_TOL_MM:
            raise ImageError(f'inconsistent series: {_instance_name(ds)} has pixel spacing {ps.tolist()} mm, '
                             f'expected {ps0.tolist()} mm')
        if (int(ds.Rows), int(ds.Columns)) != (rows0, cols0):
            raise ImageError(f'inconsistent series: {_instance_name(ds)} is {ds.Rows}x{ds.Columns}, '
                             f'expected {rows0}x{cols0}')
    if np.any(ps0 <= 0):
        raise ImageError(f'zero or negative pixel spacing {ps0.tolist()} mm')
    row_cos, col_cos = iop0[:3], iop0[3:]
    normal = np.cross(row_cos, col_cos)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3 or abs(row_cos @ col_cos) > 1e-3:
        raise ImageError(f'ImageOrientationPatient {iop0.tolist()} is not a pair of orthonormal vectors')
    positions = np.array([np.array(ds.ImagePositionPatient, float) for ds in headers])
    along = positions @ normal
    order = np.argsort(along)
    along = along[order]
    headers = [headers[n] for n in order]
    positions = positions[order]
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        n = int(np.argmin(gaps))
        raise ImageError(f'duplicate slice: {_instance_name(headers[n])} and {_instance_name(headers[n + 1])} '
                         f'share position {along[n]:.3f} mm along the slice normal')
    step = float(np.median(gaps))
    if np.max(np.abs(gaps - step)) > _SPACING_REL_TOL * step + 1e-3:
        n = int(np.argmax(np.abs(gaps - step)))
        missing = int(round(gaps[n] / step)) - 1
        what = f'{missing} missing slice(s)' if missing >= 1 else 'non-uniform slice spacing'
        raise ImageError(f'{what} between {_instance_name(headers[n])} and {_instance_name(headers[n + 1])}: '
                         f'gap {gaps[n]:.3f} mm, expected {step:.3f} mm')
    # in-plane offsets along the normal only: a sheared stack is not a regular grid
    inplane = positions - positions[0] - np.outer(along - along[0], normal)
    if np.max(np.abs(inplane)) > 0.01 * float(ps0.min()) + 1e-3:
        raise ImageError('slice positions are not stacked along the slice normal (sheared/tilted-gantry series)')

    data = np.empty((len(headers), rows0, cols0), dtype=np.float32)
    for k, ds in enumerate(headers):
        ready = decoded.get(str(getattr(ds, 'SOPInstanceUID', '')))
        data[k] = ready if ready is not None else decode_slice(ds)
    # DICOM: PixelSpacing = [row spacing (between rows, along the column direction),
    # column spacing (between columns, along the row direction)]
    direction = np.stack([row_cos, col_cos, normal], axis=1)
    spacing_mm = np.array([ps0[1], ps0[0], step])
    affine = make_affine(direction, units.mm_to_m(spacing_mm), units.mm_to_m(positions[0]))
    modality = str(getattr(first, 'Modality', 'CT'))
    metadata = {'SeriesInstanceUID': series_instance_uid, 'source': str(source),
                'SeriesDescription': str(getattr(first, 'SeriesDescription', '')),
                'FrameOfReferenceUID': str(getattr(first, 'FrameOfReferenceUID', ''))}
    return Volume(data, affine, modality, metadata)


def write_dicom_series(volume: Volume, folder, *, modality: Optional[str] = None,
                       series_description: str = 'igt_robot', patient_id: str = 'PHANTOM',
                       series_instance_uid: Optional[str] = None, study_instance_uid: Optional[str] = None,
                       extra_attributes: Optional[dict] = None):
    """Write a :class:`Volume` as one DICOM file per slice (uncompressed, explicit VR LE).

    CT is stored as unsigned 16 bit with RescaleIntercept = -1024 and slope 1,
    so HU in [-1024, 64511] round-trip to the nearest integer. MR is stored as
    unsigned 16 bit scaled by a RescaleSlope chosen so the maximum maps to 65535
    (the usual trick to keep the dynamic range of float reconstructions).
    ``extra_attributes`` (pydicom keyword -> value) go into every slice, e.g. the dose
    figures a CT writes into its headers (CTDIvol, KVP, Exposure). Returns the list of
    written paths.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    modality = modality or volume.modality
    if modality not in ('CT', 'MR'):
        raise ImageError(f'can only write CT or MR series, not {modality!r}')
    data = np.asarray(volume.data, dtype=np.float64)
    if not np.all(np.isfinite(data)):
        raise ImageError('refusing to write a volume with NaN/infinite voxels')
    direction = volume.direction
    row_cos, col_cos, slice_dir = direction[:, 0], direction[:, 1], direction[:, 2]
    if np.linalg.norm(np.cross(row_cos, col_cos) - slice_dir) > 1e-3 and \
            np.linalg.norm(np.cross(row_cos, col_cos) + slice_dir) > 1e-3:
        raise ImageError('slice axis is not perpendicular to the image plane; cannot write DICOM')
    spacing_mm = units.m_to_mm(volume.spacing)
    if modality == 'CT':
        slope, intercept = 1.0, CT_RESCALE_INTERCEPT
    else:
        lo = min(float(data.min()), 0.0)
        slope = max(float(data.max()) - lo, 1e-12) / 65535.0
        intercept = lo
    stored = np.clip(np.rint((data - intercept) / slope), 0, 65535).astype(np.uint16)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = generate_uid()
    sop_class = CT_IMAGE_STORAGE if modality == 'CT' else MR_IMAGE_STORAGE
    now = datetime.datetime.now()
    paths = []
    for k in range(data.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f'slice_{k:04d}.dcm'
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b'\0' * 128)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.PatientName = patient_id
        ds.PatientID = patient_id
        ds.StudyDate = ds.SeriesDate = now.strftime('%Y%m%d')
        ds.StudyTime = ds.SeriesTime = now.strftime('%H%M%S')
        ds.SeriesDescription = series_description
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        position_mm = units.m_to_mm(volume.index_to_scanner(np.array([0.0, 0.0, float(k)])))
        ds.ImagePositionPatient = [f'{v:.6f}' for v in position_mm]
        ds.ImageOrientationPatient = [f'{v:.8f}' for v in np.concatenate([row_cos, col_cos])]
        # PixelSpacing: [between rows (j), between columns (i)]
        ds.PixelSpacing = [f'{spacing_mm[1]:.6f}', f'{spacing_mm[0]:.6f}']
        ds.SliceThickness = f'{spacing_mm[2]:.6f}'
        ds.SpacingBetweenSlices = f'{spacing_mm[2]:.6f}'
        ds.SliceLocation = f'{float(position_mm @ np.cross(row_cos, col_cos)):.6f}'
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = 'MONOCHROME2'
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = f'{slope:.10g}'
        ds.RescaleIntercept = f'{intercept:.10g}'
        if modality == 'CT':
            ds.RescaleType = 'HU'
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        for keyword, value in (extra_attributes or {}).items():
            setattr(ds, keyword, value)
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


# ============================================================================ OpenIGTLink
def volume_from_igtl_image(message, modality='MR') -> Volume:
    """Convert a ``pyigtl.ImageMessage`` to a :class:`Volume` (LPS metres).

    pyigtl gives ``image`` as (k, j, i[, components]) and ``ijk_to_world_matrix``
    in mm in the frame named by ``world_coordinate_system`` ('ras' from Slicer).
    """
    image = np.asarray(message.image)
    if image.ndim == 4:
        if image.shape[3] != 1:
            raise ImageError(f'IGTL image has {image.shape[3]} components; only scalar images are supported')
        image = image[..., 0]
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ImageError(f'IGTL image has shape {image.shape}, expected 3-D')
    matrix_mm = np.asarray(message.ijk_to_world_matrix, dtype=float)
    if matrix_mm.shape != (4, 4):
        raise ImageError('IGTL image matrix is not 4x4')
    system = str(getattr(message, 'world_coordinate_system', 'ras')).lower()
    if system == 'ras':
        matrix_mm = frames.LPS_TO_RAS @ matrix_mm      # RAS -> LPS (the flip is its own inverse)
    elif system != 'lps':
        raise ImageError(f'unknown IGTL world coordinate system {system!r}')
    metadata = {'device_name': getattr(message, 'device_name', ''), 'source': 'OpenIGTLink'}
    return Volume(np.array(image), affine_mm_to_m(matrix_mm), modality, metadata)


def igtl_image_from_volume(volume: Volume, device_name='Image', world_coordinate_system='ras'):
    """Build a ``pyigtl.ImageMessage`` (matrix in mm, RAS by default, as Slicer expects)."""
    import pyigtl
    matrix_mm = affine_m_to_mm(volume.affine)
    if world_coordinate_system == 'ras':
        matrix_mm = frames.LPS_TO_RAS @ matrix_mm
    elif world_coordinate_system != 'lps':
        raise ValueError(f"world_coordinate_system must be 'ras' or 'lps', not {world_coordinate_system!r}")
    data = volume.data
    if data.dtype not in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.float32, np.float64):
        data = data.astype(np.float32)
    return pyigtl.ImageMessage(np.ascontiguousarray(data), ijk_to_world_matrix=matrix_mm,
                               world_coordinate_system=world_coordinate_system, device_name=device_name)
