"""The error tree.  Every exception aiofabric raises on its own account derives
from :class:`FabricError`; argument mistakes are plain ``ValueError`` /
``TypeError``; cancellation is the event loop's ``CancelledError``.

The closed/broken/busy classes also derive from anyio's exceptions of the same
name, so code written against anyio streams catches them unchanged.
"""
from __future__ import annotations

import errno as _errno

import anyio

__all__ = [
    "FabricError",
    "UnavailableError",
    "RegistrationError",
    "ClosedResourceError",
    "BrokenResourceError",
    "ProviderStuckError",
    "BusyResourceError",
    "CompletionError",
    "RemoteAccessError",
    "ProtocolError",
]


class FabricError(Exception):
    """Base of every aiofabric error."""


class UnavailableError(FabricError):
    """The requested provider, NIC or feature does not exist on this machine."""


class RegistrationError(FabricError):
    """Memory registration failed (often the locked-memory limit: see the message)."""


class ClosedResourceError(FabricError, anyio.ClosedResourceError):
    """The engine or region was closed (by this process) before or during the call."""


class BrokenResourceError(FabricError, anyio.BrokenResourceError):
    """A peer or the transport failed; operations that depend on it cannot finish."""


class ProviderStuckError(BrokenResourceError):
    """The engine's worker thread is stuck inside a provider call (it has held
    the provider's lock for longer than ``lock_timeout``), so the engine can
    neither register, add peers nor make progress.  Close the engine and open
    a new one; see docs/failures.md."""


class BusyResourceError(FabricError, anyio.BusyResourceError):
    """A queue is full; await earlier operations before posting more."""


class CompletionError(FabricError):
    """The provider reported an operation as failed.

    Attributes:
        errno: libfabric error number (positive, ``FI_E*``).
        prov_errno: the provider's own error number (0 when none).
    """

    def __init__(self, message: str, errno: int = 0, prov_errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno
        self.prov_errno = prov_errno


class RemoteAccessError(CompletionError):
    """The target rejected the access: unknown or revoked key, or out of bounds."""


class ProtocolError(FabricError, ValueError):
    """Bytes from the wire (an address, a descriptor, a message) are malformed,
    truncated, too large or of an unknown version."""


_BROKEN = {
    _errno.ECONNREFUSED,
    _errno.ECONNRESET,
    _errno.EHOSTUNREACH,
    _errno.ETIMEDOUT,
    _errno.ECONNABORTED,
    _errno.ENOTCONN,
    _errno.EPIPE,
    _errno.EHOSTDOWN,
    _errno.ENETDOWN,
    _errno.ENETUNREACH,
}
_ACCESS = {_errno.EACCES, _errno.EPERM, _errno.EKEYREJECTED, _errno.ENOKEY, _errno.EFAULT}


def completion_error(what: str, err: int, prov_errno: int, text: str) -> CompletionError | BrokenResourceError:
    """Map a failed completion (positive libfabric errno) to an exception."""
    msg = f"{what}: {text} (errno {err}, provider errno {prov_errno})"
    if err in _BROKEN:
        return BrokenResourceError(msg)
    if err in _ACCESS:
        return RemoteAccessError(msg, err, prov_errno)
    return CompletionError(msg, err, prov_errno)
