"""The shim's log: written to the fifo named `log` in the bundle, which containerd copies to its own log.

The fifo is opened without ever blocking (write-only when containerd reads it already, else read-write,
which Linux allows on a fifo), and stays non-blocking: when containerd stops reading and the pipe is
full, records are dropped and counted rather than freezing the shim.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

FORMAT = "%(asctime)s kata-shim[%(process)d] %(levelname)s %(name)s: %(message)s"


def open_log_fifo(bundle: Path) -> int | None:
    """A non-blocking write fd on `<bundle>/log`, or None when there is no such file."""
    path = bundle / "log"
    flags = os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(path, os.O_WRONLY | flags)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno != errno.ENXIO:  # ENXIO: a fifo with no reader yet
            raise
    return os.open(path, os.O_RDWR | flags)


class FifoHandler(logging.Handler):
    """Writes each record with one non-blocking write; a record that does not fit is dropped."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode(errors="replace")
            os.write(self.fd, data)
        except BlockingIOError:
            self.dropped += 1
        except OSError:
            self.dropped += 1
        except Exception:
            self.handleError(record)


def setup_logging(bundle: Path, debug: bool) -> FifoHandler | None:
    """Send the root logger to the bundle's log fifo (and stderr there too, for fatal tracebacks)."""
    fd = open_log_fifo(bundle)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if fd is None:
        return None
    os.dup2(fd, 2)
    handler = FifoHandler(fd)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    return handler
