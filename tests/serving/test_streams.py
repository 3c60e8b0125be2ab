"""The stream layer (`serving.streams`) over a real (fake-arithmetic) runtime, without a front end: a client's
cancel and its next request under the same id race on the server, and the new one must not lose."""

from __future__ import annotations

import asyncio
import time

import pytest

from kunjax.api import GenerateRequest, InvalidRequest
from kunjax.sampling_params import SamplingParams
from serving import streams
from serving.fake_runtime import FakeRuntime
from serving.metrics import ServingMetrics
from serving.streams import StreamBridge

ENDLESS = SamplingParams(max_tokens=None, temperature=0.0)


def request(rid: str, prompt: tuple[int, ...], params: SamplingParams = ENDLESS) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt=None, prompt_ids=prompt, params=params)


@pytest.fixture
def bridge():
    runtime = FakeRuntime(max_model_len=10**9, step_interval_s=0.005)
    b = StreamBridge(runtime, ServingMetrics(runtime))
    yield b
    b.close()
    runtime.shutdown(0.0)


def test_a_request_reusing_the_id_of_a_stream_whose_cancel_comes_late_waits_for_it(bridge, monkeypatch):
    """The new request reaches the bridge while the old stream is still open (its cancel not seen yet): it waits
    for the old stream to close, then runs under the id."""
    monkeypatch.setattr(streams, "CANCEL_GRACE_S", 60.0)  # (so a wait that ended by the grace would show)

    async def main() -> tuple[str | None, float]:
        old = await bridge.open([request("again", (1,))], time.monotonic())
        await old.__anext__()  # it runs
        new = asyncio.ensure_future(bridge.open([request("again", (2,), SamplingParams(max_tokens=1))],
                                                time.monotonic()))
        await asyncio.sleep(0.2)  # the new request is admitted meanwhile... and must wait, not fail
        assert not new.done()
        t0 = time.monotonic()
        old.close()  # the cancel arrives
        stream = await new
        waited = time.monotonic() - t0
        reason = None
        async for _, ev in stream:
            reason = ev.finish_reason
        stream.close()
        return reason, waited

    reason, waited = asyncio.run(main())
    assert reason == "length" and waited < streams.CANCEL_GRACE_S


def test_a_true_duplicate_is_refused_after_the_grace(bridge, monkeypatch):
    monkeypatch.setattr(streams, "CANCEL_GRACE_S", 0.3)

    async def main() -> None:
        old = await bridge.open([request("twin", (1,))], time.monotonic())
        await old.__anext__()
        t0 = time.monotonic()
        with pytest.raises(InvalidRequest, match="duplicate request id 'twin'"):
            await bridge.open([request("twin", (2,))], time.monotonic())
        assert time.monotonic() - t0 >= 0.3
        await old.__anext__()  # the old stream is untouched
        with pytest.raises(InvalidRequest, match="duplicate"):  # and still holds its id for the next one too
            await bridge.open([request("twin", (3,))], time.monotonic())
        old.close()
        finished = await bridge.open([request("twin", (4,), SamplingParams(max_tokens=2))], time.monotonic())
        assert [ev.finish_reason async for _, ev in finished][-1] == "length"
        finished.close()
        assert "twin" not in bridge._open  # a finished request's id is free at once: the next one does not wait

    asyncio.run(main())


def test_a_request_waiting_for_its_id_holds_no_admission_thread(monkeypatch):
    """The wait runs on the event loop: with a single admission thread, a client reusing a live id (a duplicate
    waiting out the grace) does not hold up anyone else's admission."""
    monkeypatch.setattr(streams, "CANCEL_GRACE_S", 30.0)
    runtime = FakeRuntime(max_model_len=10**9, step_interval_s=0.005)
    bridge = StreamBridge(runtime, ServingMetrics(runtime), admission_threads=1)

    async def main() -> None:
        old = await bridge.open([request("twin", (1,))], time.monotonic())
        await old.__anext__()
        twin = asyncio.ensure_future(bridge.open([request("twin", (2,))], time.monotonic()))
        await asyncio.sleep(0.1)
        other = await asyncio.wait_for(
            bridge.open([request("other", (3,), SamplingParams(max_tokens=1))], time.monotonic()), timeout=10)
        assert [ev.finish_reason async for _, ev in other][-1] == "length" and not twin.done()
        other.close()
        old.close()  # the twin gets the id now
        (await twin).close()

    try:
        asyncio.run(main())
    finally:
        bridge.close()
        runtime.shutdown(0.0)
