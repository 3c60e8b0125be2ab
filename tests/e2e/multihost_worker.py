"""One process of a multi-host group on loopback, for `tests/e2e/test_multihost.py`.

    python tests/e2e/multihost_worker.py --coordinator 127.0.0.1:PORT --process-id I --devices 4 \
        --job job.json --out result.json

Every process joins the group (`kunjax.multihost`) over its own `--devices` CPU devices. Process 0 builds the
engine of the job's model and config, serves the job's prompts all at once, checks the books against every
process's arrays after every step (`multihost.check_books`), steps until every group has restored, and writes
the outputs, the policy's counters and events, and each process's live bytes before and after to `--out`. The
others follow it (`multihost.follow`) and exit 0 when it stops them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--job", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-steps", type=int, default=5000)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    from kunjax import multihost

    cluster = multihost.initialize(multihost.ClusterSpec(args.coordinator, args.num_processes, args.process_id,
                                                         peer_timeout_s=60.0))
    if not cluster.is_leader:
        return multihost.follow(cluster)

    from kunjax.engine import LLMEngine, config_from_kwargs
    from kunjax.sampling_params import SamplingParams

    job = json.loads(args.job.read_text())
    eng = LLMEngine(job["model"], config_from_kwargs(**job["config"]))
    eng.warmup()
    before = multihost.check_books(eng)
    ids = [eng.add_request(p, SamplingParams(**kw)) for p, kw in zip(job["prompts"], job["params"], strict=True)]
    outputs: dict[str, list[int]] = {}
    groups: list[list[int]] = []
    for _ in range(args.max_steps):
        if not eng.has_unfinished():
            break
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        multihost.check_books(eng)
        groups += [list(g.members) for g in eng.groups if list(g.members) not in groups]
    after = multihost.check_books(eng)
    result = {
        "outputs": [outputs.get(rid) for rid in ids],
        "groups": groups,
        "stats": {k: v for k, v in eng.policy.stats().items() if isinstance(v, int | float)},
        "events": [e.kind for e in eng.policy.events],
        "unfinished": eng.has_unfinished(),
        "live_bytes_before": [st["live_bytes"] for st in before],
        "live_bytes_after": [st["live_bytes"] for st in after],
        "owners": eng.executor.inner.owners,
    }
    args.out.write_text(json.dumps(result))
    eng.executor.stop()
    cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
