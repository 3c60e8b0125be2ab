"""A separate client process for the load test: opens N concurrent Generate streams, waits until every stream
has delivered its first chunk, cancels every second one, drains the rest, and prints a JSON summary."""

from __future__ import annotations

import asyncio
import json
import sys

import grpc

from serving._generated.kunjax.serving.v2 import generate_pb2_grpc as pb_grpc
from serving.client import FINISH_REASON_NAMES, build_request


async def main(target: str, n: int, max_tokens: int, prompts: list[str]) -> dict:
    # Streams to be cancelled ask for far more tokens, so only a working cancel path frees them quickly.
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.KunjaxServiceStub(channel)
        calls = [stub.Generate(build_request(prompts[i % len(prompts)], request_id=f"load-{i}",
                                             max_tokens=max_tokens if i % 2 == 0 else 10 * max_tokens,
                                             temperature=0.0, ignore_eos=True), timeout=600)
                 for i in range(n)]
        firsts = await asyncio.gather(*(c.read() for c in calls))
        open_streams = sum(1 for f in firsts if f is not grpc.aio.EOF)
        for i, call in enumerate(calls):
            if i % 2:
                call.cancel()

        async def drain(call, first) -> tuple[str, int]:
            tokens, reason, resp = 0, "", first
            while resp is not grpc.aio.EOF:
                tokens += len(resp.token_ids)
                if resp.finish_reason:
                    reason = FINISH_REASON_NAMES[resp.finish_reason]
                resp = await call.read()
            return reason, tokens

        pairs = list(zip(calls, firsts, strict=True))
        kept = await asyncio.gather(*(drain(c, f) for c, f in pairs[::2]))
        cancelled = sum([await c.code() == grpc.StatusCode.CANCELLED for c in calls[1::2]])
    return {"open_at_once": open_streams, "kept": len(kept),
            "kept_finished": sum(1 for r, _ in kept if r == "length"),
            "kept_tokens": [t for _, t in kept], "cancelled": cancelled}


if __name__ == "__main__":
    target, n, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    prompts = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(main(target, n, max_tokens, prompts))))
