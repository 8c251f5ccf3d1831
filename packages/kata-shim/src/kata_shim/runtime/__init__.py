"""Container abstractions, the bottom layer of the shim (runtime-rs's `common` crate): the contract
(`RuntimeHandler`, `RuntimeInstance`, `Sandbox`, `ContainerManager`, their dataclasses and errors) and the
registry by `[runtime] name`. The manager that builds the pod's instance is the message layer's
(`kata_shim.message.RuntimeHandlerManager`)."""

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
