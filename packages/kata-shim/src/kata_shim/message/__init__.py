"""The layer between the services and the container abstraction: the message dispatcher and the
runtime handler manager it routes to."""

from kata_shim.message._dispatcher import MessageDispatcher
from kata_shim.message._manager import RuntimeHandlerManager

__all__ = ["MessageDispatcher", "RuntimeHandlerManager"]
