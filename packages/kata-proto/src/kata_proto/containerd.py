"""containerd's protobuf API as kata-shim speaks it: the task v2 shim service, task events,
the events ttrpc service, the sandbox API, shared types, runtime options and cgroup v1 metrics.

Modules keep their upstream package names (``containerd.task.v2`` and so on); the
service descriptors below are what `kata_proto.ttrpc` registers and calls.
"""

from __future__ import annotations

from google.protobuf import any_pb2, symbol_database
from google.protobuf.message import DecodeError, Message

from kata_proto._gen.containerd.cgroups.v1 import metrics_pb2 as cgroups_v1_metrics_pb2
from kata_proto._gen.containerd.events import task_pb2 as events_pb2
from kata_proto._gen.containerd.runtime.sandbox.v1 import sandbox_pb2
from kata_proto._gen.containerd.runtime.task.v2 import shim_pb2 as task_pb2
from kata_proto._gen.containerd.services.ttrpc.events.v1 import events_pb2 as ttrpc_events_pb2
from kata_proto._gen.containerd.types import event_pb2, metrics_pb2, mount_pb2, platform_pb2
from kata_proto._gen.containerd.types.runtimeoptions.v1 import api_pb2 as runtimeoptions_pb2
from kata_proto._gen.containerd.types.task import task_pb2 as types_task_pb2

__all__ = [
    "EVENTS_SERVICE",
    "SANDBOX_SERVICE",
    "TASK_SERVICE",
    "TOPIC_CREATE",
    "TOPIC_DELETE",
    "TOPIC_EXEC_ADDED",
    "TOPIC_EXEC_STARTED",
    "TOPIC_EXIT",
    "TOPIC_OOM",
    "TOPIC_PAUSED",
    "TOPIC_RESUMED",
    "TOPIC_START",
    "cgroups_v1_metrics_pb2",
    "event_pb2",
    "events_pb2",
    "metrics_pb2",
    "mount_pb2",
    "pack_event",
    "platform_pb2",
    "runtimeoptions_pb2",
    "sandbox_pb2",
    "task_pb2",
    "ttrpc_events_pb2",
    "types_task_pb2",
    "unpack_event",
]

#: ``containerd.task.v2.Task``: served by the shim on its socket.
TASK_SERVICE = task_pb2.DESCRIPTOR.services_by_name["Task"]
#: ``containerd.services.events.ttrpc.v1.Events``: called by the shim on TTRPC_ADDRESS.
EVENTS_SERVICE = ttrpc_events_pb2.DESCRIPTOR.services_by_name["Events"]
#: ``containerd.runtime.sandbox.v1.Sandbox``: the sandbox API a shim may serve.
SANDBOX_SERVICE = sandbox_pb2.DESCRIPTOR.services_by_name["Sandbox"]

# The topics a shim publishes its task events under (containerd's runtime.Task*EventTopic).
TOPIC_CREATE = "/tasks/create"
TOPIC_START = "/tasks/start"
TOPIC_DELETE = "/tasks/delete"
TOPIC_EXIT = "/tasks/exit"
TOPIC_OOM = "/tasks/oom"
TOPIC_EXEC_ADDED = "/tasks/exec-added"
TOPIC_EXEC_STARTED = "/tasks/exec-started"
TOPIC_PAUSED = "/tasks/paused"
TOPIC_RESUMED = "/tasks/resumed"


def pack_event(msg: Message) -> any_pb2.Any:
    """Wrap an event in an Any whose type_url is the bare full name (``containerd.events.TaskExit``).

    containerd's typeurl registry, and `ctr events`, expect the bare name without the
    ``type.googleapis.com/`` prefix that ``Any.Pack`` would add.
    """
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


def unpack_event(event: any_pb2.Any) -> Message:
    """Decode an Any produced by `pack_event` (a prefixed type_url is accepted too).

    Raises ValueError when the type is not a known message or the bytes do not parse as it.
    """
    name = event.type_url.rsplit("/", 1)[-1]
    try:
        cls = symbol_database.Default().GetSymbol(name)
    except KeyError:
        raise ValueError(f"unknown event type {event.type_url!r}") from None
    msg: Message = cls()
    try:
        msg.ParseFromString(event.value)
    except DecodeError as err:
        raise ValueError(f"corrupt {name} event: {err}") from err
    return msg
