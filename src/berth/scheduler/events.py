"""Marathon's event bus: publish in-process, fan out to SSE subscribers.

Each subscriber has its own bounded queue. A subscriber that falls that far
behind is dropped (its stream ends) rather than slowing the scheduler or
growing memory without bound; Marathon closes slow event-stream consumers the
same way, and SSE clients reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from berth.scheduler.models import now_timestamp

log = logging.getLogger("berth.scheduler.events")

DEFAULT_QUEUE_SIZE = 1024
HEARTBEAT_SECONDS = 15.0

# Marathon's event types (docs/event-bus.md); filters naming anything else get a 400.
EVENT_TYPES = frozenset(
    {
        "api_post_event",
        "event_stream_attached",
        "event_stream_detached",
        "status_update_event",
        "instance_changed_event",
        "health_status_changed_event",
        "failed_health_check_event",
        "unhealthy_task_kill_event",
        "unhealthy_instance_kill_event",
        "add_health_check_event",
        "remove_health_check_event",
        "deployment_info",
        "deployment_step_success",
        "deployment_step_failure",
        "deployment_success",
        "deployment_failed",
        "group_change_success",
        "group_change_failed",
        "app_terminated_event",
        "framework_message_event",
        "scheduler_registered_event",
        "scheduler_reregistered_event",
        "scheduler_disconnected_event",
        "subscribe_event",
        "unsubscribe_event",
        "pod_created_event",
        "pod_updated_event",
        "pod_deleted_event",
        "instance_health_changed_event",
        "unknown_instance_terminated_event",
    }
)

_END: dict[str, Any] = {}


class Subscription(AsyncIterator[dict[str, Any]]):
    """One consumer's view of the bus; iterate it, ``close()`` when done."""

    def __init__(self, bus: EventBus, event_types: frozenset[str] | None, size: int) -> None:
        self._bus = bus
        self.event_types = event_types
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(size)
        self.closed = False
        self.overflowed = False

    def __repr__(self) -> str:
        state = "overflowed" if self.overflowed else "closed" if self.closed else "open"
        types = sorted(self.event_types) if self.event_types else "all"
        return f"<Subscription {state} types={types} queued={self._queue.qsize()}>"

    def wants(self, event_type: str) -> bool:
        return self.event_types is None or event_type in self.event_types

    def _offer(self, event: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            log.warning("dropping a slow event subscriber (%d events behind)", self._queue.qsize())
            self.overflowed = True
            self._end()

    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._bus._remove(self)
        # Make room for the end marker: a dropped subscriber gets nothing more anyway.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_END)

    def close(self) -> None:
        self._end()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        event = await self._queue.get()
        if event is _END:
            # Keep the marker so every later call also ends.
            self._queue.put_nowait(_END)
            raise StopAsyncIteration
        return event


class EventBus:
    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self.queue_size = queue_size
        self._subscribers: list[Subscription] = []
        self.published = 0

    def __repr__(self) -> str:
        return f"<EventBus subscribers={len(self._subscribers)} published={self.published}>"

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, event_type: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Send to every matching subscriber now; returns the event as sent."""
        event = {"eventType": event_type, "timestamp": now_timestamp(), **payload}
        event["eventType"] = event_type
        self.published += 1
        for sub in list(self._subscribers):
            if sub.wants(event_type):
                sub._offer(event)
        return event

    def subscribe(self, event_types: set[str] | frozenset[str] | None = None) -> Subscription:
        """Registered at once, so nothing published after this call is missed."""
        sub = Subscription(self, frozenset(event_types) if event_types else None, self.queue_size)
        self._subscribers.append(sub)
        return sub

    def close(self) -> None:
        """End every subscription (shutdown: SSE streams finish instead of hanging)."""
        for sub in list(self._subscribers):
            sub.close()

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)


class EventStreamEndpoint:
    """``GET /v2/events``: the bus as Server-Sent Events, Marathon's framing.

    ``event: <type>`` / ``data: <json>`` frames; ``?event_type=`` (repeatable)
    filters; a comment line every ``heartbeat_seconds`` keeps idle proxies and
    clients from timing the stream out. A raw ASGI app because the stream must
    also watch for the client's disconnect to publish the detach event.
    """

    def __init__(self, bus: EventBus, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.bus = bus
        self.heartbeat_seconds = heartbeat_seconds

    def __repr__(self) -> str:
        return f"<EventStreamEndpoint heartbeat={self.heartbeat_seconds}s {self.bus!r}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        if request.method != "GET":
            await _send_json(send, 405, {"message": "Method Not Allowed"})
            return
        if "text/event-stream" not in request.headers.get("accept", ""):
            message = "GET /v2/events needs the header Accept: text/event-stream"
            await _send_json(send, 405, {"message": message})
            return
        types = set(request.query_params.getlist("event_type"))
        unknown = sorted(types - EVENT_TYPES)
        if unknown:
            await _send_json(send, 400, {"message": f"Unknown event_type {unknown[0]!r}"})
            return
        remote = request.client.host if request.client else ""
        # Subscribe before announcing, so the stream carries its own attach event.
        subscription = self.bus.subscribe(types or None)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache, no-store, must-revalidate"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        self.bus.publish("event_stream_attached", {"remoteAddress": remote})
        try:
            await self._stream(subscription, receive, send)
        except asyncio.CancelledError:
            # The server cancels open streams when its graceful shutdown times out;
            # for an endless response that is its normal end, not an error to log.
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        finally:
            subscription.close()
            self.bus.publish("event_stream_detached", {"remoteAddress": remote})

    async def _stream(self, subscription: Subscription, receive: Receive, send: Send) -> None:
        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        gone = asyncio.ensure_future(client_gone())
        pending: asyncio.Future[dict[str, Any]] | None = None
        try:
            # A first comment gets the headers through buffering proxies at once.
            await _send_body(send, b": attached\n\n")
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(subscription))
                waiting: set[asyncio.Future[Any]] = {pending, gone}
                done, _ = await asyncio.wait(
                    waiting,
                    timeout=self.heartbeat_seconds,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if gone in done:
                    return
                if pending not in done:
                    await _send_body(send, b":\n\n")
                    continue
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    # Dropped as too slow, or the bus closed (shutdown): end the response.
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                pending = None
                frame = f"event: {event['eventType']}\ndata: {json.dumps(event)}\n\n"
                await _send_body(send, frame.encode())
        except OSError:
            # The client went away mid-write.
            return
        finally:
            gone.cancel()
            if pending is not None:
                pending.cancel()


async def _send_body(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _send_json(send: Send, status: int, body: Mapping[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
