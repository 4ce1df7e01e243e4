"""The one place where a kernel errno becomes a gRPC status with a google.rpc ErrorInfo."""

from __future__ import annotations

import errno

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from vkernel.kernel.errors import KernelError

DOMAIN = "vkernel.v1"

# errno → the gRPC code a client library would branch on. The errno itself always travels
# in ErrorInfo.reason, so the SDK can rebuild the exact OSError.
_ERRNO_CODES: dict[int, grpc.StatusCode] = {
    errno.EINVAL: grpc.StatusCode.INVALID_ARGUMENT,
    errno.E2BIG: grpc.StatusCode.INVALID_ARGUMENT,
    errno.EBADF: grpc.StatusCode.INVALID_ARGUMENT,
    errno.ENOTTY: grpc.StatusCode.INVALID_ARGUMENT,
    errno.ESRCH: grpc.StatusCode.NOT_FOUND,
    errno.ENOENT: grpc.StatusCode.NOT_FOUND,
    errno.ECHILD: grpc.StatusCode.NOT_FOUND,
    errno.EEXIST: grpc.StatusCode.ALREADY_EXISTS,
    errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
    errno.EACCES: grpc.StatusCode.PERMISSION_DENIED,
    errno.ENOMEM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EMFILE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EAGAIN: grpc.StatusCode.UNAVAILABLE,
    errno.EINTR: grpc.StatusCode.ABORTED,
    errno.EBUSY: grpc.StatusCode.FAILED_PRECONDITION,
    errno.EFAULT: grpc.StatusCode.FAILED_PRECONDITION,
    errno.EOVERFLOW: grpc.StatusCode.OUT_OF_RANGE,
    errno.ERANGE: grpc.StatusCode.OUT_OF_RANGE,
    errno.EOPNOTSUPP: grpc.StatusCode.UNIMPLEMENTED,
    errno.ENOSYS: grpc.StatusCode.UNIMPLEMENTED,
    errno.EIO: grpc.StatusCode.DATA_LOSS,
}


def grpc_code_for(err: int) -> grpc.StatusCode:
    """The gRPC status code that carries ``err``."""
    return _ERRNO_CODES.get(err, grpc.StatusCode.FAILED_PRECONDITION)


def error_info(reason: str, metadata: dict[str, str]) -> error_details_pb2.ErrorInfo:
    """An ErrorInfo in vkernel's domain."""
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)


def status_for_kernel_error(err: KernelError) -> grpc.Status:
    """KernelError → grpc.Status with ErrorInfo(reason=errno name, metadata incl. errno)."""
    metadata = {"errno": str(err.errno), **err.metadata}
    return _status(grpc_code_for(err.errno), err.message, error_info(err.name, metadata))


def status_for(code: grpc.StatusCode, message: str, reason: str) -> grpc.Status:
    """A non-errno status (UNAUTHENTICATED …) with an ErrorInfo naming the reason."""
    return _status(code, message, error_info(reason, {}))


def _status(code: grpc.StatusCode, message: str, info: error_details_pb2.ErrorInfo) -> grpc.Status:
    detail = any_pb2.Any()
    detail.Pack(info)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    return rpc_status.to_status(proto)
