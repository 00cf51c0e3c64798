"""grpc.health.v1 for a server that drains: grpc_health's servicer, whose Watch streams
end once the drain is over.

`enter_graceful_shutdown()` (grpc_health's own) turns every name NOT_SERVING and
tells the watchers; `end_watches()` then ends each Watch stream with OK after its last
status went out, so a drained server's shutdown waits on no watcher, and a watching
client (a load balancer, a sidecar) sees the stream end and looks elsewhere.

This reads grpc_health's `_server_status` / `_server_watchers` (grpcio-health-checking
is pinned in the lock; tests/e2e/test_rolling_restart.py fails if they change).
"""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class DrainingHealthServicer(HealthServicer):  # type: ignore[misc]  # grpc_health is untyped
    def __init__(self) -> None:
        super().__init__()
        self._ended = False

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        service = request.service
        condition = self._server_watchers[service]
        self._watcher_count_by_service[service] += 1
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(service, SERVICE_UNKNOWN)
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        last = status
                    if self._ended:
                        return  # the stream ends with OK after the last status
                    await condition.wait()
        finally:
            self._watcher_count_by_service[service] -= 1
            if self._watcher_count_by_service[service] == 0:
                del self._server_watchers[service]
                del self._watcher_count_by_service[service]

    async def end_watches(self) -> None:
        """End every Watch stream (each sends its latest status first)."""
        self._ended = True
        for condition in list(self._server_watchers.values()):
            async with condition:
                condition.notify_all()
