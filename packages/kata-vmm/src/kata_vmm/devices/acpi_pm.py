"""The registers a hardware-reduced ACPI FADT points at: sleep control/status and reset (ACPI 6.4 §4.8.3.7).

The guest powers off by writing SLP_EN with the sleep type of \\_S5 to the
sleep-control register, and reboots by writing the FADT's reset value to the
reset register.
"""

from __future__ import annotations

from collections.abc import Callable

from kata_vmm._layout import ACPI_RESET_VALUE, S5_SLEEP_TYPE

SLEEP_CONTROL_OFFSET = 0
SLEEP_STATUS_OFFSET = 1
RESET_OFFSET = 2
SLP_EN = 1 << 5
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
WAK_STS = 1 << 7


class AcpiPowerDevice:
    """Three byte registers; S5 calls ``on_power_off``, a reset calls ``on_reset``."""

    def __init__(self, on_power_off: Callable[[], None], on_reset: Callable[[], None]) -> None:
        self._on_power_off = on_power_off
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> bytes:
        """All registers read 0 (no wake event pending)."""
        return b"\x00" * size

    def write(self, offset: int, data: bytes) -> None:
        """Act on S5 entry and reset writes; other sleep states are ignored."""
        value = data[0]
        if offset == SLEEP_CONTROL_OFFSET and value & SLP_EN:
            if (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLEEP_TYPE:
                self._on_power_off()
        elif offset == RESET_OFFSET and value == ACPI_RESET_VALUE:
            self._on_reset()
