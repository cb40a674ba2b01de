from __future__ import annotations

import asyncio

from berth.scheduler.events import EventBus


async def test_publish_adds_type_and_timestamp() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    sent = bus.publish("deployment_success", {"id": "d1"})
    got = await anext(sub)
    assert got == sent
    assert got["eventType"] == "deployment_success" and got["id"] == "d1"
    assert got["timestamp"].endswith("Z")


async def test_filter_by_type() -> None:
    bus = EventBus()
    sub = bus.subscribe({"status_update_event"})
    bus.publish("deployment_success", {"id": "d1"})
    bus.publish("status_update_event", {"taskId": "t"})
    assert (await anext(sub))["taskId"] == "t"
    assert "types=['status_update_event']" in repr(sub)


async def test_close_ends_iteration_and_unsubscribes() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    assert bus.subscriber_count == 1
    bus.publish("a_event", {})
    sub.close()
    assert bus.subscriber_count == 0
    assert [e async for e in sub] == []
    assert [e async for e in sub] == []
    assert "closed" in repr(sub)


async def test_slow_subscriber_is_dropped_not_blocking() -> None:
    bus = EventBus(queue_size=3)
    slow = bus.subscribe()
    fast = bus.subscribe()
    for i in range(3):
        bus.publish("e", {"n": i})
    assert [(await anext(fast))["n"] for _ in range(3)] == [0, 1, 2]
    bus.publish("e", {"n": 3})
    assert slow.overflowed and "overflowed" in repr(slow)
    assert [e async for e in slow] == []
    assert (await anext(fast))["n"] == 3
    assert bus.subscriber_count == 1


async def test_bus_close_wakes_waiting_subscribers() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    waiter = asyncio.ensure_future(anext(sub, None))
    await asyncio.sleep(0)
    bus.close()
    assert await waiter is None
    assert repr(bus) == "<EventBus subscribers=0 published=0>"
