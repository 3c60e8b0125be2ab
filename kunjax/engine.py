"""The multi-instance engine: loads a model onto N instances, routes requests, and steps them all.

Owns request admission (validation, tokenization, routing), the controller loop over instances, and applying
sampled tokens (stop conditions, detokenization, finish). Each instance steps independently: `step()` first
dispatches every instance's device step (asynchronously), then completes them, so a slow instance does not
serialise the others. Requests never move between instances here (that is a policy's job: `--policy kunserve`
fuses instances into pipeline groups and back, `kunjax/elastic/`); the router picks the instance or admitting
group with the least KV demand relative to its capacity.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from kunjax import checkpoint, policies
from kunjax.config import ConfigError, EngineConfig, ModelConfig
from kunjax.detokenizer import IncrementalDetokenizer
from kunjax.instance import MAX_SUPPRESSED, Instance, num_kv_blocks, tree_bytes_per_device
from kunjax.model import param_shapes
from kunjax.request import Request, RequestOutput, RequestStatus, make_output
from kunjax.sampling_params import SamplingParams
from kunjax.tokenizer import Tokenizer
from sharding.layouts import LayoutError, check_tp, instance_meshes, param_shardings

log = logging.getLogger("kunjax")


def resolve_model_path(model: str | Path) -> Path:
    """`"demo"` -> the built-in demo checkpoint (trained and cached on first use); else a directory."""
    if str(model) == "demo":
        from kunjax.demo import ensure_demo_model

        return ensure_demo_model(log=log.info)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model {str(model)!r}: no such directory (give a Hugging Face model directory, "
                          f"a kunjax checkpoint, or 'demo')")
    return path


class LLMEngine:
    def __init__(self, model: str | Path = "demo", config: EngineConfig | None = None,
                 devices: Sequence[jax.Device] | None = None):
        self.config = config or EngineConfig()
        self.model_path = resolve_model_path(model)
        self.model_config: ModelConfig = checkpoint.load_config(self.model_path)
        self.tokenizer: Tokenizer | None = checkpoint.load_tokenizer(self.model_path)
        ecfg, cfg = self.config, self.model_config
        self.max_model_len = ecfg.resolved_max_model_len(cfg)
        devices = list(devices) if devices is not None else jax.devices()
        try:
            check_tp(ecfg.tp, num_kv_heads=cfg.num_kv_heads, num_heads=cfg.num_heads,
                     intermediate_size=cfg.intermediate_size)
            meshes = instance_meshes(devices, ecfg.num_instances, ecfg.tp)
        except LayoutError as e:
            raise ConfigError(str(e)) from e
        t0 = time.perf_counter()
        shapes = param_shapes(cfg)
        first = checkpoint.load_params(self.model_path, cfg, param_shardings(meshes[0], shapes), ecfg.dtype)
        # Other replicas are device-to-device copies of the first: the checkpoint is read once.
        params = [first] + [jax.device_put(first, param_shardings(m, shapes)) for m in meshes[1:]]
        # Replicas get equal pools (the smallest any device affords), so any of them can fuse into a group.
        blocks = {num_kv_blocks(cfg, ecfg, m, tree_bytes_per_device(p)) for m, p in zip(meshes, params, strict=True)}
        icfg = ecfg if len(blocks) == 1 else dataclasses.replace(ecfg, num_blocks=min(blocks))
        self.instances = [Instance(i, m, cfg, icfg, p) for i, (m, p) in enumerate(zip(meshes, params, strict=True))]
        self.load_seconds = time.perf_counter() - t0
        self.warmup_seconds = 0.0
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._rng = random.Random(ecfg.seed)
        eos = set(cfg.eos_token_ids) | (set(self.tokenizer.eos_token_ids) if self.tokenizer else set())
        self.eos_token_ids = frozenset(eos)
        self.elastic = None
        if ecfg.policy == "kunserve":
            from kunjax.elastic.controller import KunServeController

            self.elastic = KunServeController(self)
        self.policy = policies.install(self)  # swap, migrate, layerkv: hooks and memory beyond the device pools

    def warmup(self) -> float:
        """Compile every instance's step for every bucket (ahead of serving); returns seconds."""
        t0 = time.perf_counter()
        for inst in self.instances:
            inst.warmup()
        if self.policy is not None:
            self.policy.warmup()
        if self.elastic is not None:
            self.elastic.warmup()
        self.warmup_seconds = time.perf_counter() - t0
        return self.warmup_seconds

    # ---- admission ----------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer.json: pass prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt)
            return prompt, ids
        ids = [int(t) for t in prompt]
        return None, ids

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate, tokenize and route one request; raises ValueError with a message on bad input."""
        params = params or SamplingParams()
        text, ids = self.encode(prompt)
        cfg = self.model_config
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the model context (--max-model-len) is "
                             f"{self.max_model_len}, leaving no room to generate")
        params.validate_for(cfg.vocab_size, self.config.max_logprobs)
        if params.min_tokens and len(set(params.stop_token_ids) | self.eos_token_ids) > MAX_SUPPRESSED:
            raise ValueError(f"min_tokens with more than {MAX_SUPPRESSED} stop token ids + EOS ids is not supported")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        max_total = self.max_model_len if params.max_tokens is None else min(
            self.max_model_len, len(ids) + params.max_tokens)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(request_id=request_id, prompt=text, token_ids=list(ids), num_prompt_tokens=len(ids),
                      params=params, seed=seed, eos_token_ids=self.eos_token_ids, max_total_len=max_total,
                      logprobs=[] if params.logprobs is not None else None)
        if self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer.from_params(self.tokenizer, list(ids), params)
        elif params.stop:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        self._route(req)  # raises ValueError if it could never fit
        self.requests[request_id] = req
        return request_id

    def _route(self, req: Request) -> None:
        """Least KV demand relative to capacity among free instances and admitting pipeline groups."""
        first = self.instances[0].scheduler
        if not first.can_ever_fit(req):  # also for groups: a restore must be able to take it home
            raise ValueError(f"request {req.request_id} may need {first.blocks_for(req.max_total_len)} KV blocks "
                             f"({req.max_total_len} tokens) but an instance pool has {first.allocator.total}")
        free = [inst for inst in self.instances if inst.group is None]
        groups = [g for g in self.groups if g.books.admitting] or ([] if free else self.groups)
        new_blocks = first.blocks_for(len(req.token_ids) + 1)
        units = [(inst.scheduler, inst.allocator.total, inst) for inst in free]
        units += [(g.books, g.books.total_blocks, g) for g in groups]
        sched, _, unit = min(units, key=lambda u: ((u[0].demand_blocks() + new_blocks) / u[1], len(u[0].waiting)))
        sched.add(req)
        if unit in groups:
            req.group = unit
        else:
            req.instance = unit.index

    @property
    def groups(self) -> list:
        return self.elastic.groups if self.elastic is not None else []

    def _owner(self, req: Request):
        """What schedules the request: its pipeline group's books, or its instance's scheduler."""
        return req.group.books if req.group is not None else self.instances[req.instance].scheduler

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None or req.finished:
            return None
        self._owner(req).abort(req)
        req.status, req.finish_reason, req.finish_time = RequestStatus.FINISHED, "abort", time.monotonic()
        return make_output(req)

    # ---- stepping -----------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        """Work is left: a request, or a pipeline group (idle groups step towards their restore)."""
        return self.has_requests() or bool(self.groups)

    def has_requests(self) -> bool:
        return (any(inst.scheduler.has_work for inst in self.instances)
                or any(g.books.has_work for g in self.groups))

    def step(self) -> list[RequestOutput]:
        """One step of every instance with work; returns an output for every request that advanced."""
        pending = [(inst, inst.dispatch()) for inst in self.instances if inst.group is None]
        outputs: list[RequestOutput] = []

        def apply(owner, sampled) -> None:
            for req, token, logprob, top_ids, top_lps in sampled:
                self._append_token(owner, req, token, logprob, top_ids, top_lps)
                outputs.append(make_output(req))
                if req.finished:
                    self.requests.pop(req.request_id, None)

        # Groups run their ticks while the instances' steps are in flight on their own devices; every group's
        # tick is launched before any is read, so groups overlap too. A tick's tokens are applied before the
        # next tick is scheduled.
        groups = list(self.groups)
        for t in range(max((g.k for g in groups), default=0)):
            launched = [(g, g.launch_tick()) for g in groups if t < g.k]
            for g, pending_tick in launched:
                sampled = g.finish_tick(pending_tick)
                if sampled:
                    apply(g.books, sampled)
        for g in groups:
            g.exchange_round()
        for inst, p in pending:
            if p is not None:
                apply(inst.scheduler, inst.complete(p))
        if self.elastic is not None:
            self.elastic.after_step()
        if self.policy is not None:
            self.policy.after_step()
        return outputs

    def _append_token(self, owner, req: Request, token: int, logprob: float, top_ids: np.ndarray,
                      top_lps: np.ndarray) -> None:
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
        req.token_ids.append(token)
        p = req.params
        if req.logprobs is not None:
            entry = {token: logprob}
            for tid, lp in zip(top_ids[:p.logprobs].tolist(), top_lps[:p.logprobs].tolist(), strict=True):
                entry.setdefault(int(tid), float(lp))
            req.logprobs.append(entry)
            req.cumulative_logprob += logprob
        detok = req.detokenizer
        reason: tuple[str, int | str | None] | None = None
        if detok is not None and detok.add(token)[1]:  # a stop string completed (min_tokens already applied)
            reason = ("stop", detok.stop_reason)
        elif req.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                reason = ("stop", token)
            elif not p.ignore_eos and token in req.eos_token_ids:
                reason = ("stop", None)
        if reason is None and len(req.token_ids) >= req.max_total_len:
            reason = ("length", None)
        if reason is not None:
            if detok is not None:
                detok.finish()  # flush text held back as a possible stop-string start
            req.finish_reason, req.stop_reason = reason
            req.finish_time = now
            owner.finish(req)

    # ---- introspection ------------------------------------------------------------------------------
    def load(self) -> list[dict[str, int]]:
        out = []
        for inst in self.instances:
            d = inst.load()
            d["group"] = -1 if inst.group is None else inst.group.gid
            out.append(d)
        return out

    def check_books(self) -> None:
        """Every instance's and group's books balance; each block's refcount equals the requests holding it plus
        the policy's own references (`reserved_blocks`, e.g. an in-flight migration's destination copies)."""
        for g in self.groups:
            g.books.check()
        if self.policy is not None:
            self.policy.check()
        for inst in self.instances:
            if inst.group is not None:
                assert not inst.scheduler.has_work, f"instance {inst.index} is in a group but has requests"
                continue
            inst.allocator.check()
            held = collections.Counter(
                b for r in itertools.chain(inst.scheduler.running, inst.scheduler.waiting) for b in r.blocks)
            reserved = getattr(self.policy, "reserved_blocks", None)
            if reserved is not None:
                held.update(reserved(inst.index))
            for b in range(inst.allocator.num_blocks):
                assert inst.allocator.refcount(b) == held.get(b, 0), (
                    f"instance {inst.index} block {b}: refcount {inst.allocator.refcount(b)} but "
                    f"{held.get(b, 0)} requests and policy reservations hold it")


def config_from_kwargs(**kwargs) -> EngineConfig:
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"unknown engine options {sorted(unknown)}; valid: {sorted(names)}")
    return EngineConfig(**kwargs)
