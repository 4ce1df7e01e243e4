"""The uffd fd's wire: Linux's ioctl numbers and struct layouts, and the datagram headers.

Shared by the daemon's end (:mod:`vkernel.api.uffd_fd`, which describes the protocol) and
the SDK's (:mod:`vkclient.uffd_fd`); nothing here imports the kernel.
"""

from __future__ import annotations

import struct

UFFD_FD_READ = 0
"""The read(2) request (not an ioctl number: those all have a direction bit set)."""


def _ioc(direction: int, nr: int, size: int) -> int:
    """_IOC(dir, 0xAA, nr, size): an ioctl number of userfaultfd's type 0xAA."""
    return direction << 30 | size << 16 | 0xAA << 8 | nr


_IOR, _IOWR = 2, 3
UFFDIO_API = _ioc(_IOWR, 0x3F, 24)
UFFDIO_REGISTER = _ioc(_IOWR, 0x00, 32)
UFFDIO_UNREGISTER = _ioc(_IOR, 0x01, 16)
UFFDIO_WAKE = _ioc(_IOR, 0x02, 16)
UFFDIO_COPY = _ioc(_IOWR, 0x03, 40)
UFFDIO_ZEROPAGE = _ioc(_IOWR, 0x04, 32)
UFFDIO_MOVE = _ioc(_IOWR, 0x05, 40)
UFFDIO_WRITEPROTECT = _ioc(_IOWR, 0x06, 24)
UFFDIO_CONTINUE = _ioc(_IOWR, 0x07, 32)
UFFDIO_POISON = _ioc(_IOWR, 0x08, 32)

REQUEST = struct.Struct("<II")
"""A request's header: cmd, tag."""
ANSWER = struct.Struct("<IIiI")
"""An answer's header: cmd, tag, errno, 0."""
READ_ARGS = struct.Struct("<II")
"""read(2)'s argument: count (bytes), flags (O_NONBLOCK)."""
UFFD_MSG = struct.Struct("<BBHI24s")
"""struct uffd_msg: event, reserved, reserved, reserved, the 24-byte union."""
MSG_SIZE = UFFD_MSG.size
PAGEFAULT = struct.Struct("<QQI4x")
"""The union's pagefault arm: flags, address, ptid."""
FORK = struct.Struct("<I20x")
"""The union's fork arm: ufd."""
RANGE3 = struct.Struct("<QQQ")
"""uffdio_api {api, features, ioctls}; also remap {from, to, len}."""
RANGE2 = struct.Struct("<QQ")
"""uffdio_range {start, len}; also the remove/unmap arm {start, end}."""
RANGE_MODE = struct.Struct("<QQQ")
"""uffdio_writeprotect {range, mode}."""
RANGE_MODE_RESULT = struct.Struct("<QQQq")
"""uffdio_zeropage / continue / poison {range, mode, result}; uffdio_register {range, mode,
ioctls} has the same shape."""
COPY = struct.Struct("<QQQQq")
"""uffdio_copy / uffdio_move {dst, src, len, mode, result}."""

MAX_COPY_BYTES = 64 * 4096
"""Source bytes one UFFDIO_COPY datagram may carry (a bigger copy is several ioctls)."""
MAX_DATAGRAM = ANSWER.size + COPY.size + MAX_COPY_BYTES
SOCKET_BUFFER = 1 << 20
"""SO_SNDBUF/SO_RCVBUF asked for on both ends (the host caps it; a 256 KiB COPY must fit)."""
