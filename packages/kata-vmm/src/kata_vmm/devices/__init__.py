"""Legacy platform devices: 16550 serial, i8042 reset, the hardware-reduced ACPI power registers."""

from kata_vmm.devices.acpi_pm import AcpiPowerDevice
from kata_vmm.devices.i8042 import I8042Device
from kata_vmm.devices.serial import Serial

__all__ = ["AcpiPowerDevice", "I8042Device", "Serial"]
