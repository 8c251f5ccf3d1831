"""A background health checker: Health.Check every interval, a callback when the agent stops answering."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from kata_agent_client._client import AgentClient
from kata_agent_client._errors import AgentConnectionLost, AgentDisconnected, AgentError

#: runtime-rs checks the agent every 30 s.
CHECK_INTERVAL = 30.0


class HealthChecker:
    """Run `await checker.run()` in a nursery; `on_unhealthy(error)` is awaited once per failure streak.

    With `max_failures` > 0, `run` returns once that many checks in a row failed (the agent is taken for
    dead: the caller decides what that means); `streak` and `last_error` say how it got there.
    """

    def __init__(
        self,
        client: AgentClient,
        on_unhealthy: Callable[[BaseException | None], Awaitable[None]],
        *,
        interval: float = CHECK_INTERVAL,
        timeout: float = 5.0,
        max_failures: int = 0,
    ) -> None:
        self.client = client
        self.on_unhealthy = on_unhealthy
        self.interval = interval
        self.timeout = timeout
        self.checks = 0
        self.failures = 0
        self.streak = 0
        self.max_failures = max_failures
        self.last_error: BaseException | None = None
        self.healthy = True

    async def check_once(self) -> bool:
        """One Health.Check within `timeout` (guest time when the client has the guest's clock, as its
        calls do); records and returns the outcome."""
        error: BaseException | None = None
        ok = False
        try:
            ok = await self.client.within(self.timeout, self.client.check)
        except AgentDisconnected as err:
            if not isinstance(err, AgentConnectionLost):
                # Between a lost connection and the client's next one: the reconnect budget decides, not
                # this check (it is neither a success nor a failure).
                return False
            error = err
        except (trio.TooSlowError, AgentError) as err:
            error = err
        self.checks += 1
        if not ok:
            self.failures += 1
            self.streak += 1
            self.last_error = error
            if self.healthy:
                self.healthy = False
                await self.on_unhealthy(error)
        else:
            self.healthy = True
            self.streak = 0
        return ok

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check every `interval` seconds: forever, or until `max_failures` checks in a row failed."""
        task_status.started()
        while True:
            await self.check_once()
            if 0 < self.max_failures <= self.streak:
                return
            await trio.sleep(self.interval)
