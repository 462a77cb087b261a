"""Detached background tasks: they run between calls and are cancelled, awaited, on close."""

from __future__ import annotations

import anyio
import pytest

from stockade._background import BackgroundTasks

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_tasks_run_detached_and_stop_on_close() -> None:
    tasks = BackgroundTasks("test")
    ticks: list[int] = []
    stopped = anyio.Event()

    async def ticker() -> None:
        try:
            while True:
                ticks.append(1)
                await anyio.sleep(0.01)
        finally:
            stopped.set()

    tasks.start(ticker)
    await anyio.sleep(0.1)  # the caller returns to other work; the task keeps running
    assert len(ticks) > 3
    await tasks.aclose()
    assert stopped.is_set()
    count = len(ticks)
    await anyio.sleep(0.05)
    assert len(ticks) == count
    with pytest.raises(RuntimeError):
        tasks.start(ticker)


async def test_failures_are_logged_not_lost(caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks("test")

    async def boom() -> None:
        raise ValueError("kaput")

    tasks.start(boom)
    await anyio.sleep(0.01)
    await tasks.aclose()
    assert "kaput" in caplog.text
