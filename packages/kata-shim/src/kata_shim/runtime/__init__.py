"""Container abstractions: the contract (`RuntimeHandler`, `RuntimeInstance`, `Sandbox`,
`ContainerManager`, their dataclasses and errors), the registry by `[runtime] name`, and the manager
that builds the pod's instance."""

from kata_shim.runtime._base import (
    AlreadyExists,
    ContainerConfig,
    ContainerManager,
    ExecConfig,
    ExitStatus,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ProcessId,
    ProcessState,
    ProcessStatus,
    Publisher,
    RootfsMount,
    RuntimeHandler,
    RuntimeHandlerError,
    RuntimeInstance,
    Sandbox,
    Stdio,
)
from kata_shim.runtime._registry import RUNTIME_HANDLERS, runtime_handler

__all__ = [
    "RUNTIME_HANDLERS",
    "AlreadyExists",
    "ContainerConfig",
    "ContainerManager",
    "ExecConfig",
    "ExitStatus",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "ProcessId",
    "ProcessState",
    "ProcessStatus",
    "Publisher",
    "RootfsMount",
    "RuntimeHandler",
    "RuntimeHandlerError",
    "RuntimeInstance",
    "Sandbox",
    "Stdio",
    "runtime_handler",
]
