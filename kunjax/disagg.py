"""Prefill/decode disaggregation (DistServe, Splitwise; MemServe's PD-caching): replicas take a role.

`--roles` gives each instance one: `prefill` units take every new request, compute its prompt and sample its first
token; `decode` units take no new request, only the requests prefill units hand them; `mixed` units (the
default, and every unit when `--roles` is empty) do both. After each step, every request on a prefill unit whose
prompt is computed (it has its first token, and more to generate) is handed to a decode unit (`Handoff.send`):

* the decode unit is the one holding the longest cached prefix of the request's tokens (with prefix caching: a
  conversation's earlier turns, which it decoded), then the least loaded, among those with a free sequence slot;
* what it already holds is matched in its index; the rest of the request's computed KV goes over in one
  `Transfer` into newly allocated blocks, and with prefix caching its full blocks join the decode unit's index
  (`transfer_with_insert`): the next turn of the conversation sends only its new blocks (PD-caching);
* the request leaves the prefill unit (its prompt blocks stay cached there) and runs on the decode unit with
  everything it computed: nothing is recomputed.

When no decode unit has room, the request keeps decoding where it is and is offered again after the next step.
The KV goes at once after the prefill's last tick, or (`--pd-stream-groups G`) streamed in G layer groups as the
prefill computes them, so only the last group's share follows it: on simulated time the cost model charges that
share; an executor on one host copies the blocks after the tick either way (a cross-host transport would stream).
Only replica units and the recompute policy (fusing, swapping or migrating across roles is not designed).
Counted: handoffs, blocks sent and reused, bytes sent, and the transfers' time: modelled when time is modelled, else
measured by the executor that can (the JAX executor waits for each handoff's copy and times it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kunjax.plan import Transfer
from kunjax.request import Request, RequestStatus
from kunjax.transfers import insert_received

if TYPE_CHECKING:
    from kunjax.cost_model import CostModel
    from kunjax.mempool import MemoryPool
    from kunjax.unit import ServingUnit


class Handoff:
    """Moves requests from prefill to decode units (module docstring)."""

    def __init__(self, mempool: MemoryPool, block_size: int, block_bytes: int, cost: CostModel | None = None,
                 streamed: int = 1, measured: Callable[[], float | None] = lambda: None):
        """`measured()`: the executor's wall time of the transfers it was asked to time (None: it cannot)."""
        self.mempool, self.block_size, self.block_bytes, self.cost = mempool, block_size, block_bytes, cost
        self.streamed, self.measured = streamed, measured
        self.handoffs = self.blocks_sent = self.blocks_reused = self.waits = 0
        self.modelled_s = 0.0

    @staticmethod
    def ready(unit: ServingUnit) -> list[Request]:
        """Requests of a prefill unit with their prompt computed and tokens left to decode, out of the pipe."""
        return [r for r in unit.running if not r.in_flight and r.status is RequestStatus.RUNNING
                and r.num_computed >= r.num_prompt_tokens and r.num_computed == len(r.token_ids) - 1
                and r.stale is None]

    def send(self, req: Request, src: ServingUnit, decodes: Sequence[ServingUnit]) -> ServingUnit | None:
        """Hand `req` from `src` to a decode unit; the unit, or None when none has room now."""
        bs, computed = self.block_size, req.num_computed
        n_blocks = -(-computed // bs)
        open_units = [d for d in decodes if len(d.running) < d.max_running]
        if not open_units:
            self.waits += 1
            return None

        def key(d: ServingUnit) -> tuple:
            held = len(d.index.longest(req.token_ids)) if d.enable_prefix_caching else 0
            return -held, d.demand_blocks() / d.total_blocks, d.uid

        for dst in sorted(open_units, key=key):
            own = dst.index.match(req.token_ids) if dst.enable_prefix_caching else []  # (at most computed // bs)
            got = dst.allocate(n_blocks - len(own)) if n_blocks > len(own) else [[]]
            if got is not None:
                break
            for node in own:  # give the references back: this one has no room
                dst.stages[0].free([node.blocks[0]])
            dst.index.release(own)
        else:
            self.waits += 1
            return None
        sent = got[0]
        if sent:
            self.mempool.transfer(src, dst, req.tables[0][len(own):n_blocks], sent, self.streamed,
                                  measure=self.cost is None)
        table = [n.blocks[0] for n in own] + sent
        path = list(own)
        if dst.enable_prefix_caching:  # the full blocks join the decode unit's index (transfer_with_insert)
            full = range(len(own), computed // bs)
            received = table[len(own):computed // bs]
            path += insert_received(dst, own[-1] if own else None,
                                    [tuple(req.token_ids[j * bs:(j + 1) * bs]) for j in full], received)
            table[len(own):computed // bs] = received
        src.running.remove(req)
        src.release(req)  # its prompt's full blocks stay cached on the prefill unit
        req.tables, req.index_path, req.num_computed = [table], path, computed
        dst.take_running(req)
        self.handoffs += 1
        self.blocks_sent += len(sent)
        self.blocks_reused += len(own)
        if self.cost is not None and sent:
            ids = tuple(range(len(sent)))
            op = Transfer(src.members[0], dst.members[0], ids, ids, self.streamed)
            self.modelled_s += max(self.cost.op_seconds(op).values())
        return dst

    def stats(self) -> dict[str, int]:
        out = {"pd_handoffs": self.handoffs, "pd_blocks_sent": self.blocks_sent,
               "pd_blocks_reused": self.blocks_reused, "pd_bytes_sent": self.blocks_sent * self.block_bytes,
               "pd_handoff_waits": self.waits}
        if self.cost is not None:
            out["pd_transfer_us_modelled"] = round(self.modelled_s * 1e6)
        elif (measured := self.measured()) is not None:
            out["pd_transfer_us_measured"] = round(measured * 1e6)
        return out
