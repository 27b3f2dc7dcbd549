"""The one exception hierarchy of medai.

Every message names the file or object concerned and the reason, and where it
helps, what to do next. Messages never contain patient identifiers: name files
by path (paths are chosen by the user, never derived from patient data) and
objects by UID or pseudonym.
"""

from __future__ import annotations

from pathlib import Path


class MedaiError(Exception):
    """Base class of every error medai raises on purpose."""

    #: Process exit code the CLI uses when this error ends a command.
    exit_code: int = 1


class ConfigError(MedaiError):
    """A setting is missing, malformed or contradictory."""

    exit_code = 2


class DicomInputError(MedaiError):
    """A DICOM file or series cannot be used; names the file and the reason."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else Path(path)
        self.reason = reason
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{reason}")


class UnsafeInputError(DicomInputError):
    """Input refused because reading it could exhaust memory, recurse without
    bound or escape a directory (decompression bombs, absurd lengths,
    path-like UIDs)."""


class SeriesGeometryError(DicomInputError):
    """A series cannot form a consistent volume (gaps, duplicates, mixed
    orientation, tilt that was not resampled, missing position tags)."""


class ModelIntegrityError(MedaiError):
    """A model bundle is unsigned, tampered with, or not trusted."""


class ModelNotFoundError(MedaiError):
    """No installed model has the requested id."""


class BackendError(MedaiError):
    """An inference backend could not be created or failed its parity check."""


class ResourceError(MedaiError):
    """The planned run does not fit the memory budget."""


class AuditWriteError(MedaiError):
    """The audit trail could not be written; the operation on patient data did
    not happen (fail closed)."""


class AuditVerificationError(MedaiError):
    """The audit trail or an attestation failed verification."""


class EgressBlocked(MedaiError, PermissionError):
    """A network connection to a destination that is not configured was
    refused by the egress guard. Also a PermissionError (an OSError), so network
    libraries treat it as a failed connection instead of crashing."""


class PacsError(MedaiError):
    """A DICOM network operation failed (association, status, peer)."""


class PromptError(MedaiError):
    """An interactive prompt (plane, slice index, box) does not fit the image it
    targets: a slice out of range, an empty box or a box outside the slice."""

    exit_code = 2
