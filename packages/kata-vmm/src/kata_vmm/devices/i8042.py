"""Just enough of an i8042 keyboard controller for a guest to reset the machine.

The status port reads 0x01 (output buffer full, input buffer empty): a probing
driver gives up quickly, and the kernel's reboot loop, which waits for the input
buffer to drain, sends the 0xFE pulse-reset command at once.
"""

from __future__ import annotations

from collections.abc import Callable

DATA_PORT_OFFSET = 0  # port 0x60
COMMAND_PORT_OFFSET = 4  # port 0x64
STATUS_OUTPUT_FULL = 0x01
CMD_RESET_CPU = 0xFE


class I8042Device:
    """Ports 0x60-0x64; the CPU-reset command calls ``on_reset``."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self.resets = 0

    def read(self, offset: int, size: int) -> bytes:
        """Status reads 0x01; data reads 0."""
        value = STATUS_OUTPUT_FULL if offset == COMMAND_PORT_OFFSET else 0
        return bytes([value]) + b"\x00" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        """Only the CPU-reset command has an effect."""
        if offset == COMMAND_PORT_OFFSET and data[0] == CMD_RESET_CPU:
            self.resets += 1
            self._on_reset()
