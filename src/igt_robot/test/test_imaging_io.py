"""Volume geometry, DICOM/NIfTI/OpenIGTLink I/O and bad-input handling."""
import shutil

import numpy as np
import pydicom
import pytest

from igt_robot import frames, units
from igt_robot.imaging import (ImageError, Volume, igtl_image_from_volume, make_affine, read_dicom_series,
                               read_nifti, validate_intensities, volume_from_igtl_image, write_dicom_series,
                               write_nifti)
from igt_robot.imaging.phantom import rotation_from_euler_deg


def oblique_volume(modality='CT', shape=(7, 9, 11), spacing=(0.0008, 0.0009, 0.003), seed=0):
    rng = np.random.default_rng(seed)
    direction = rotation_from_euler_deg(12.0, -7.0, 25.0)
    affine = make_affine(direction, spacing, (0.012, -0.105, 0.033))
    if modality == 'CT':
        data = rng.integers(-1000, 2000, size=shape).astype(np.float32)
    else:
        data = rng.uniform(0.0, 850.0, size=shape).astype(np.float32)
    return Volume(data, affine, modality)


def voxel_positions(volume):
    nk, nj, ni = volume.data.shape
    kk, jj, ii = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing='ij')
    return volume.index_to_scanner(np.stack([ii, jj, kk], axis=-1).reshape(-1, 3).astype(float))


# ----------------------------------------------------------------------------- Volume
def test_volume_geometry_and_sitk_round_trip():
    vol = oblique_volume()
    assert np.allclose(vol.spacing, [0.0008, 0.0009, 0.003])
    assert np.allclose(vol.direction.T @ vol.direction, np.eye(3))
    p = vol.index_to_scanner(np.array([3.0, 4.0, 5.0]))
    assert np.allclose(vol.scanner_to_index(p), [3, 4, 5])
    image = vol.to_sitk()
    # ITK geometry is in mm
    assert np.allclose(image.GetSpacing(), [0.8, 0.9, 3.0])
    assert np.allclose(image.TransformContinuousIndexToPhysicalPoint((3.0, 4.0, 5.0)), units.m_to_mm(p))
    back = Volume.from_sitk(image, 'CT')
    assert np.allclose(back.affine, vol.affine, atol=1e-12)
    assert np.array_equal(back.data, vol.data)


def test_volume_rejects_zero_spacing_and_shear():
    with pytest.raises(ImageError, match='zero voxel spacing'):
        Volume(np.zeros((3, 3, 3)), make_affine(np.eye(3), (0.001, 0.0, 0.001), (0, 0, 0)))
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(ImageError, match='not orthonormal'):
        Volume(np.zeros((3, 3, 3)), sheared)
    with pytest.raises(ImageError, match='3-D'):
        Volume(np.zeros((3, 3)), np.eye(4))


@pytest.mark.parametrize('data, message', [
    (np.full((4, 5, 6), np.nan, np.float32), 'NaN'),
    (np.zeros((4, 5, 6), np.float32), 'all zero'),
    (np.full((4, 5, 6), 7.0, np.float32), 'constant'),
    (np.random.default_rng(0).uniform(-1e30, 1e30, (4, 5, 6)).astype(np.float32), 'implausible'),
])
def test_validate_intensities_rejects_garbage(data, message):
    with pytest.raises(ImageError, match=message):
        validate_intensities(Volume(data, np.eye(4) * 0.001 + np.diag([0, 0, 0, 0.999]), 'MR'))


def test_validate_intensities_ct_range_and_slices():
    affine = make_affine(np.eye(3), (0.001,) * 3, (0, 0, 0))
    raw = Volume(np.random.default_rng(1).uniform(0, 60000, (4, 8, 8)).astype(np.float32), affine, 'CT')
    with pytest.raises(ImageError, match='Hounsfield'):
        validate_intensities(raw)
    thin = Volume(np.random.default_rng(1).uniform(-1000, 1000, (2, 8, 8)), affine, 'CT')
    with pytest.raises(ImageError, match='2 slice'):
        validate_intensities(thin, min_slices=3)


# ----------------------------------------------------------------------------- DICOM
@pytest.mark.parametrize('modality', ['CT', 'MR'])
def test_dicom_round_trip_oblique_anisotropic(tmp_path, modality):
    vol = oblique_volume(modality)
    paths = write_dicom_series(vol, tmp_path / 'series')
    assert len(paths) == vol.data.shape[0]
    ds = pydicom.dcmread(str(paths[0]))
    assert ds.Modality == modality
    # DICOM stores LPS millimetres
    assert np.allclose(np.array(ds.ImagePositionPatient, float), units.m_to_mm(vol.origin), atol=1e-5)
    back = read_dicom_series(tmp_path / 'series')
    assert back.modality == modality
    assert back.data.shape == vol.data.shape
    assert np.allclose(voxel_positions(back), voxel_positions(vol), atol=1e-8)
    tolerance = 0.5 if modality == 'CT' else (850.0 / 65535.0)
    assert np.max(np.abs(back.data - vol.data)) <= tolerance + 1e-3


def test_dicom_reader_sorts_shuffled_files(tmp_path):
    vol = oblique_volume('CT')
    paths = write_dicom_series(vol, tmp_path / 's')
    # rename so the file order no longer matches the slice order
    for n, p in enumerate(paths):
        p.rename(p.with_name(f'img_{(7 * n) % len(paths):03d}_{n}.dcm'))
    back = read_dicom_series(tmp_path / 's')
    assert np.allclose(back.data, np.rint(vol.data), atol=0.5)


def test_dicom_two_series_in_folder(tmp_path):
    write_dicom_series(oblique_volume('CT'), tmp_path / 'mix')
    second = tmp_path / 'other'
    write_dicom_series(oblique_volume('CT', seed=3), second)
    for p in second.iterdir():
        shutil.move(str(p), str(tmp_path / 'mix' / f'b_{p.name}'))
    with pytest.raises(ImageError, match='2 series'):
        read_dicom_series(tmp_path / 'mix')
    uid = str(pydicom.dcmread(str(next((tmp_path / 'mix').glob('b_*')))).SeriesInstanceUID)
    chosen = read_dicom_series(tmp_path / 'mix', series_instance_uid=uid)
    assert chosen.metadata['SeriesInstanceUID'] == uid


def test_dicom_missing_slice(tmp_path):
    paths = write_dicom_series(oblique_volume('CT'), tmp_path / 's')
    paths[3].unlink()
    with pytest.raises(ImageError, match='missing slice'):
        read_dicom_series(tmp_path / 's')


def test_dicom_duplicate_slice(tmp_path):
    paths = write_dicom_series(oblique_volume('CT'), tmp_path / 's')
    ds = pydicom.dcmread(str(paths[2]))
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(str(tmp_path / 's' / 'dup.dcm'))
    with pytest.raises(ImageError, match='duplicate slice'):
        read_dicom_series(tmp_path / 's')


def test_dicom_inconsistent_orientation(tmp_path):
    paths = write_dicom_series(oblique_volume('CT'), tmp_path / 's')
    ds = pydicom.dcmread(str(paths[4]))
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(str(paths[4]))
    with pytest.raises(ImageError, match='orientation'):
        read_dicom_series(tmp_path / 's')


def test_dicom_zero_spacing(tmp_path):
    paths = write_dicom_series(oblique_volume('CT'), tmp_path / 's')
    for p in paths:
        ds = pydicom.dcmread(str(p))
        ds.PixelSpacing = [0, 0]
        ds.save_as(str(p))
    with pytest.raises(ImageError, match='zero'):
        read_dicom_series(tmp_path / 's')


def test_dicom_empty_or_missing_folder(tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'notes.txt').write_text('not dicom')
    with pytest.raises(ImageError, match='no DICOM images'):
        read_dicom_series(tmp_path / 'empty')
    with pytest.raises(ImageError, match='does not exist'):
        read_dicom_series(tmp_path / 'nope')


def test_dicom_writer_refuses_nan(tmp_path):
    vol = oblique_volume('CT')
    vol.data[0, 0, 0] = np.nan
    with pytest.raises(ImageError, match='NaN'):
        write_dicom_series(vol, tmp_path / 's')


# ----------------------------------------------------------------------------- NIfTI
def test_nifti_round_trip_preserves_orientation(tmp_path):
    import nibabel as nib
    vol = oblique_volume('MR')
    path = tmp_path / 'vol.nii.gz'
    write_nifti(vol, path)
    # on disk: RAS millimetres, data indexed [i, j, k]
    img = nib.load(str(path))
    lps_mm = units.m_to_mm(vol.index_to_scanner(np.array([2.0, 3.0, 4.0])))
    ras_mm = img.affine @ np.array([2.0, 3.0, 4.0, 1.0])
    assert np.allclose(ras_mm[:3], lps_mm * [-1, -1, 1], atol=1e-4)
    assert np.isclose(np.asarray(img.dataobj)[2, 3, 4], vol.data[4, 3, 2])
    back = read_nifti(path, modality='MR')
    assert np.allclose(back.affine, vol.affine, atol=1e-9)
    assert np.allclose(back.data, vol.data)


def test_nifti_unreadable(tmp_path):
    bad = tmp_path / 'bad.nii'
    bad.write_bytes(b'definitely not nifti')
    with pytest.raises(ImageError, match='cannot read NIfTI'):
        read_nifti(bad)


# ----------------------------------------------------------------------------- OpenIGTLink
def _igtl_round_trip(message):
    import pyigtl
    packed = message.pack()
    header = pyigtl.MessageBase.parse_header(packed[:58])
    received = pyigtl.MessageBase.create_message(header['message_type'])
    received.unpack(header, packed[58:])
    return received


def test_igtl_image_ras_to_lps_known_voxel():
    import pyigtl
    data = np.zeros((4, 5, 6), np.float32)
    data[3, 2, 1] = 100.0          # voxel (i=1, j=2, k=3)
    matrix_ras_mm = np.array([[2.0, 0, 0, 10.0],
                              [0, 2.0, 0, 20.0],
                              [0, 0, 3.0, 30.0],
                              [0, 0, 0, 1.0]])
    msg = pyigtl.ImageMessage(data, ijk_to_world_matrix=matrix_ras_mm, world_coordinate_system='ras',
                              device_name='Scan')
    vol = volume_from_igtl_image(_igtl_round_trip(msg))
    k, j, i = np.argwhere(vol.data == 100.0)[0]
    point = vol.index_to_scanner(np.array([i, j, k], float))
    # RAS (12, 24, 39) mm -> LPS (-12, -24, 39) mm -> metres
    assert np.allclose(point, [-0.012, -0.024, 0.039], atol=1e-6)


def test_igtl_image_lps_header_is_not_flipped():
    import pyigtl
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    matrix = np.diag([1.0, 1.0, 1.0, 1.0])
    matrix[:3, 3] = [5.0, 6.0, 7.0]
    msg = pyigtl.ImageMessage(data, ijk_to_world_matrix=matrix, world_coordinate_system='lps')
    vol = volume_from_igtl_image(_igtl_round_trip(msg))
    assert np.allclose(vol.origin, [0.005, 0.006, 0.007], atol=1e-6)


def test_igtl_volume_round_trip_oblique():
    vol = oblique_volume('MR')
    msg = igtl_image_from_volume(vol, device_name='Plan')
    assert msg.world_coordinate_system == 'ras'
    back = volume_from_igtl_image(_igtl_round_trip(msg))
    # the IGTL matrix is float32 mm: ~1e-7 relative precision
    assert np.allclose(voxel_positions(back), voxel_positions(vol), atol=2e-6)
    assert np.array_equal(back.data, vol.data)
    ras = frames.lps_to_ras(units.m_to_mm(vol.origin))
    assert np.allclose(np.asarray(msg.ijk_to_world_matrix)[:3, 3], ras, atol=1e-3)
