"""Hardware backends behind one interface: serial controller, emulator, MuJoCo.

Use :func:`create_backend` to get a :class:`~igt_robot.hardware.interface.HardwareInterface`
by name; backends are imported lazily so that e.g. the serial path never needs MuJoCo.
"""
from igt_robot.hardware.interface import HardwareInterface

BACKENDS = ('mujoco', 'serial')


def import_backend(kind: str) -> None:
    """Import a backend's module now (an unknown kind is left to :func:`create_backend` to refuse).

    A node calls this before its executors spin: importing MuJoCo holds the interpreter for a few
    hundred ms, and inside a configure that runs while the interlock thread is already receiving it
    stalled that thread past the scanner staleness limit."""
    name = str(kind).strip().lower()
    if name == 'mujoco':
        import igt_robot.hardware.mujoco_backend  # noqa: F401
    elif name == 'serial':
        import igt_robot.hardware.serial_driver  # noqa: F401


def create_backend(kind: str, **params) -> HardwareInterface:
    """Construct a hardware backend (not yet connected).

    ``kind``: ``'mujoco'`` -> :class:`igt_robot.hardware.mujoco_backend.MujocoHardware`
    (params: urdf_path, realtime, timestep, counts_per_unit, noise_std, backlash, seed, ...);
    ``'serial'`` -> :class:`igt_robot.hardware.serial_driver.SerialHardware`
    (params: port, baudrate, ...). ValueError for an unknown kind.
    """
    name = str(kind).strip().lower()
    if name == 'mujoco':
        from igt_robot.hardware.mujoco_backend import MujocoHardware
        return MujocoHardware(**params)
    if name == 'serial':
        from igt_robot.hardware.serial_driver import SerialHardware
        return SerialHardware(**params)
    raise ValueError(f'unknown hardware backend {kind!r}; choose one of {", ".join(BACKENDS)}')
