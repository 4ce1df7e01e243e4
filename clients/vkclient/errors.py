"""gRPC failures back into Python exceptions: an errno becomes the OSError os would raise."""

from __future__ import annotations

import errno
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "vkernel.v1"
_DETAILS_KEY = "grpc-status-details-bin"


class VkernelError(Exception):
    """A gRPC failure that carries no errno (transport trouble, internal errors)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.reason = reason


class SessionError(VkernelError):
    """The session is unknown, expired, or the TCP token was refused (UNAUTHENTICATED)."""


class UserFaultError(OSError):
    """A user access hit SIGSEGV or SIGBUS; ``signal`` and ``address`` say where (EFAULT)."""

    signal: str
    address: int


def error_info(e: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail a vkernel status carries, if any."""
    trailing: Any = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    for key, value in trailing or ():
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info
    return None


def from_rpc_error(e: grpc.RpcError) -> Exception:
    """Rebuild the exception a vkernel call means: OSError subclass by errno, else VkernelError."""
    code: grpc.StatusCode = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    message: str = (e.details() if hasattr(e, "details") else None) or str(code)
    info = error_info(e)
    if info is not None and info.domain == DOMAIN and hasattr(errno, info.reason):
        num = getattr(errno, info.reason)
        meta = dict(info.metadata)
        err: OSError
        if "signal" in meta:
            fault = UserFaultError(num, message)
            fault.signal = meta["signal"]
            fault.address = int(meta.get("address", "0"), 16)
            err = fault
        else:
            err = OSError(num, message)  # picks ProcessLookupError, PermissionError … itself
        err.metadata = meta  # type: ignore[attr-defined]
        return err
    reason = info.reason if info is not None else ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return SessionError(code, message, reason)
    return VkernelError(code, message, reason)
