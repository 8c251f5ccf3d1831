"""The services a shim serves to containerd (the Task API) and the events it sends back.

The Sandbox API and an Image service have their place here; they are not served yet (containerd
gets Unimplemented for them)."""

from kata_shim.service._errors import status_for, to_ttrpc_error
from kata_shim.service._events import EventPublisher, PublisherStatistics
from kata_shim.service._task import TaskService, decode_options

__all__ = [
    "EventPublisher",
    "PublisherStatistics",
    "TaskService",
    "decode_options",
    "status_for",
    "to_ttrpc_error",
]
