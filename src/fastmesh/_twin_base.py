"""What the pure-Python twin's modules (_engine_py, _twin_exchange, _twin_tls)
share: the two sides of a connection and the error that names the side that failed."""

from __future__ import annotations

DOWN, UP = 0, 1  # the side that connected to us, the side we connected to


class SideError(Exception):
    """recv/send failed on one side of a connection; the other side gets the reset."""

    def __init__(self, side: int, error: OSError) -> None:
        super().__init__(side, error)
        self.side = side  # DOWN or UP
        self.errno = error.errno or 0
