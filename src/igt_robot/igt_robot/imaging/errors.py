"""Exceptions raised by the imaging package.

``ImageError`` means the *input* is unusable (malformed file, NaNs, zero
spacing, inconsistent DICOM series, implausible intensities). A
``RegistrationRejected`` means the input was readable but a registration
quality gate failed; its ``reason`` is the operator-facing explanation.
"""


class ImageError(ValueError):
    """An image or image series cannot be used; the message names the problem."""


class RegistrationRejected(RuntimeError):
    """A registration did not pass its quality gates.

    ``reason`` is a one-line, operator-readable explanation such as
    ``"Z-frame rod 6 not found in 9 of 12 slices"``.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
