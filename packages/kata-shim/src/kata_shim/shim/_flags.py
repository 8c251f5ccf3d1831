"""The command line containerd gives a shim, parsed the way Go's `flag` package parses it.

containerd runs ``containerd-shim-kata-v2 -namespace NS -address SOCK -publish-binary BIN -id ID
[-bundle DIR] [-debug] start|delete``; the shim's run mode is the same flags with no action.
"""

from __future__ import annotations

_STRING_FLAGS = {
    "namespace": "namespace",
    "id": "id",
    "address": "address",
    "publish-binary": "publish_binary",
    "bundle": "bundle",
    "socket": "socket",
}
_BOOL_FLAGS = {"debug": "debug", "v": "version"}
ACTIONS = ("start", "delete", "run")
_FIELDS = ("namespace", "id", "address", "publish_binary", "bundle", "socket", "debug", "version", "action")


class UsageError(ValueError):
    """The command line is not one containerd would give (unknown flag, missing value or action)."""


class ShimFlags:
    """The parsed command line.

    `address` is containerd's gRPC socket (the shim socket address is derived from it); `action` is
    start, delete, or run (no action: serve as the long-running shim). A plain class with a dataclass's
    constructor, equality and repr: `dataclasses` imports `inspect`, which costs `start` (a fresh
    interpreter per container) a quarter of a second under nested TCG.
    """

    def __init__(  # noqa: PLR0917 - positional too, as the dataclass it replaces
        self,
        namespace: str = "",
        id: str = "",
        address: str = "",
        publish_binary: str = "containerd",
        bundle: str = "",
        socket: str = "",
        debug: bool = False,
        version: bool = False,
        action: str = "run",
    ) -> None:
        self.namespace = namespace
        self.id = id
        self.address = address
        self.publish_binary = publish_binary
        self.bundle = bundle
        self.socket = socket
        self.debug = debug
        self.version = version
        self.action = action

    def _astuple(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in _FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShimFlags) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._astuple() == other._astuple()

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value (as a dataclass)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _FIELDS)
        return f"{type(self).__name__}({fields})"

    def to_argv(self) -> list[str]:
        """Flags that make a copy of this shim run with the same identity (no action)."""
        argv = ["-namespace", self.namespace, "-id", self.id, "-address", self.address]
        argv += ["-publish-binary", self.publish_binary]
        if self.bundle:
            argv += ["-bundle", self.bundle]
        if self.debug:
            argv.append("-debug")
        return argv


def parse_flags(argv: list[str]) -> ShimFlags:
    """Parse `argv` (without the program name). Raises `UsageError`."""
    flags = ShimFlags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name = arg.lstrip("-")
        if arg.startswith("---") or not name:
            raise UsageError(f"bad flag syntax: {arg}")
        name, has_value, value = name.partition("=")
        if name in _BOOL_FLAGS:
            if has_value:
                if value.lower() not in ("true", "false", "1", "0", "t", "f"):
                    raise UsageError(f"invalid boolean value {value!r} for -{name}")
                setattr(flags, _BOOL_FLAGS[name], value.lower() in ("true", "1", "t"))
            else:
                setattr(flags, _BOOL_FLAGS[name], True)
            i += 1
            continue
        if name not in _STRING_FLAGS:
            raise UsageError(f"flag provided but not defined: -{name}")
        if not has_value:
            if i + 1 >= len(argv):
                raise UsageError(f"flag needs an argument: -{name}")
            i += 1
            value = argv[i]
        setattr(flags, _STRING_FLAGS[name], value)
        i += 1
    rest = argv[i:]
    if rest:
        if rest[0] not in ("start", "delete"):
            raise UsageError(f"unknown action {rest[0]!r} (start, delete, or none to run the shim)")
        flags.action = rest[0]
    return flags
