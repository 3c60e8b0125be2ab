"""`kunjax bench --server`: the replay's target over gRPC, against a running `kunjax serve`.

Implements `kunjax.bench.targets.Target` on the wall clock with one `grpc.aio` channel on its own event-loop thread
and one streaming `Generate` call per request (an asyncio task each, no thread per request); unary calls
(`GetServerInfo`, `GetLoad`) go on a synchronous channel. It records each request's timestamps as its responses
arrive, like the in-process target, and maps gRPC failures to the bench's finish reasons (rejected, abort,
error). `advance` only lets wall time pass: the server works on its own.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from kunjax.bench.metrics import RequestRecord
from kunjax.bench.targets import LoadRow, TargetInfo, finish_record, scheduled_from_queue, since
from kunjax.clock import WALL

POLL_S = 0.05  # longest wait in `advance` (responses are recorded by the asyncio thread meanwhile)


class GrpcTarget:
    clock = WALL

    def __init__(self, address: str, *, block_size: int, auth_token: str | None = None,
                 tls_ca: Path | None = None, timeout_s: float = 30.0):
        from serving.client import KunjaxClient

        self.address, self.block_size = address, block_size
        self._token, self._tls_ca = auth_token, tls_ca
        self.client = KunjaxClient(address, timeout_s=timeout_s, auth_token=auth_token, tls_ca=tls_ca)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-grpc", daemon=True)
        self._thread.start()
        self._calls: dict[str, object] = {}
        self._aclient = asyncio.run_coroutine_threadsafe(self._make_async_client(), self._loop).result(30)

    async def _make_async_client(self):
        from serving.client import AsyncKunjaxClient

        return AsyncKunjaxClient(self.address, timeout_s=None, auth_token=self._token, tls_ca=self._tls_ca)

    def info(self) -> TargetInfo:
        ri = self.client.info()
        notes = ["over gRPC the server's special tokens are not reported: prompts avoid its EOS ids and ids 0-2"]
        block_size = ri.block_size
        if not block_size:  # a server older than the field
            block_size = self.block_size
            notes.append(f"the server does not report its block size: --block-size {block_size} is assumed")
        excluded = set(range(min(3, ri.vocab_size))) | set(ri.eos_token_ids)
        pool = ri.kv_pool_blocks
        if not pool:  # a server older than the field: its allocators' blocks (less what its policy set aside)
            pool = sum(x.kv_total for x in self.client.load())
            notes.append("the server does not report its KV pool: the workload is fitted to its allocators' blocks")
        return TargetInfo(
            policy=ri.policy, model=ri.model, vocab_size=ri.vocab_size, max_model_len=ri.max_model_len,
            block_size=block_size, kv_capacity_blocks=pool,
            excluded_ids=tuple(sorted(excluded)), instances=tuple(ri.instances), versions=dict(ri.versions),
            notes=tuple(notes))

    def start(self, record: RequestRecord, prompt_ids: list[int], t0: float) -> None:
        asyncio.run_coroutine_threadsafe(self._serve(record, prompt_ids, t0), self._loop)

    def advance(self, until: float) -> None:
        self.clock.sleep_until(min(self.clock.now() + POLL_S, until))

    async def _serve(self, record: RequestRecord, prompt_ids: list[int], t0: float) -> None:
        import grpc

        from serving.client import FINISH_REASON_NAMES

        rid = record.request_id
        try:
            call = self._aclient.generate(prompt_ids, request_id=rid, session_id=record.session_id,
                                          max_tokens=record.max_tokens, temperature=0.0, ignore_eos=True)
            self._calls[rid] = call
            record.submit_s = since(t0)
            async for resp in call:
                now = since(t0)
                if resp.token_ids:
                    if record.first_token_s is None:
                        record.first_token_s = now
                    record.output_tokens += len(resp.token_ids)
                    if record.output_ids is not None:
                        record.output_ids += resp.token_ids
                if resp.finish_reason:
                    record.cached_tokens = resp.usage.cached_tokens
                    scheduled_from_queue(record, resp.usage.queue_time_s)
                    finish_record(record, now, FINISH_REASON_NAMES.get(resp.finish_reason, "error"), resp.error)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if record.finish_reason is not None:  # INTERNAL after a final message that said "error": said already
                return
            reason = ("rejected" if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
                      else "abort" if code == grpc.StatusCode.CANCELLED else "error")
            finish_record(record, since(t0), reason, f"{code.name}: {e.details()}")
        except asyncio.CancelledError:
            finish_record(record, since(t0), "abort", "cancelled by the client")
        except Exception as e:  # a client-side failure must not leave the replay waiting
            finish_record(record, since(t0), "error", f"{type(e).__name__}: {e}")
        finally:
            if record.finish_reason is None:
                finish_record(record, since(t0), "error", "the stream ended without a final message")
            self._calls.pop(rid, None)

    def abort(self, request_id: str) -> None:
        call = self._calls.get(request_id)
        if call is not None:
            self._loop.call_soon_threadsafe(call.cancel)

    def load(self) -> list[LoadRow]:
        return self.client.load()

    def policy_events(self) -> list:
        return list(self.client.policy_status().events)

    def policy_stats(self) -> dict[str, int]:
        return dict(self.client.policy_status().counters)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._aclient.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self.client.close()
