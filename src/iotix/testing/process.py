"""What the test servers (Mosquitto, NATS, RabbitMQ, Tansu, coap-server) share: reading
their logs and stopping the one process each started."""

from __future__ import annotations

import logging
import signal
import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["log_tail", "read_log_since", "stop_process"]

_log = logging.getLogger(__name__)


def log_tail(log: bytes, lines: int = 30) -> str:
    """The last ``lines`` lines of a server's log, for an error message."""
    return "\n".join(log.decode("utf-8", errors="replace").splitlines()[-lines:])


def read_log_since(path: Path, offset: int) -> bytes:
    """What a server wrote to its log after ``offset`` bytes."""
    with path.open("rb") as log:
        log.seek(offset)
        return log.read()


def stop_process(
    process: subprocess.Popen[bytes] | None,
    timeout_s: float,
    *,
    name: str,
    signum: int = signal.SIGTERM,
) -> None:
    """Stop a server this code started: ``signum``, then, after ``timeout_s``, a kill.
    Nothing to do when it is gone already."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signum)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        _log.warning("%s pid %d ignored signal %d; killing it", name, process.pid, signum)
        process.kill()
        process.wait()
