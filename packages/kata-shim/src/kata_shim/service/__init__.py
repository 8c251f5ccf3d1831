"""The services a shim serves to containerd (the Task API and the Sandbox API) and the events it sends back.

An Image service has its place here; it is not served yet (containerd gets Unimplemented for it)."""

from kata_shim.service._errors import status_for, to_ttrpc_error
from kata_shim.service._events import EventPublisher, PublisherStatistics
from kata_shim.service._sandbox import SandboxService, merge_metrics, sandbox_container_config
from kata_shim.service._task import TaskService, decode_options

__all__ = [
    "EventPublisher",
    "PublisherStatistics",
    "SandboxService",
    "TaskService",
    "decode_options",
    "merge_metrics",
    "sandbox_container_config",
    "status_for",
    "to_ttrpc_error",
]
