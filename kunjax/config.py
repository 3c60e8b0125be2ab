"""Typed configuration: one dataclass per concern, defaults in one place.

`ModelConfig` describes the decoder architecture (read from an HF `config.json` or from kunjax's own
checkpoint); `EngineConfig` describes how it is served (instances, KV budget, the model context, the kernel),
with the scheduler's options (`SchedulerConfig`: batching limits, compile buckets, prefix caching) and the
memory policy's (its own `Options` class, in its module under `kunjax.policies`). Every field is a CLI flag
(`kunjax.options` generates them). Invalid values and unsupported features fail here, at load time, with a
message that names the flag — never later inside a jitted step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar

from kunjax import faults
from pallas_kernels import BACKENDS as ATTENTION_BACKENDS

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
# Memory-overload policies (kunjax/policies, kunjax/elastic).
POLICIES = ("recompute", "swap", "migrate", "layerkv", "kunserve")


ROLES = ("prefill", "decode", "mixed")  # prefill/decode disaggregation (kunjax.disagg)


def _expand_roles(spec: str) -> list[str]:
    roles: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        role, _, count = part.partition(":")
        if role not in ROLES:
            raise ValueError(f"--roles: unknown role {role!r} in {spec!r} (prefill, decode or mixed)")
        try:
            n = int(count) if count else 1
        except ValueError:
            raise ValueError(f"--roles: {part!r}: the count must be an integer") from None
        if n < 1:
            raise ValueError(f"--roles: {part!r}: the count must be >= 1")
        roles += [role] * n
    if "decode" in roles and all(r == "decode" for r in roles):
        raise ValueError("--roles: every instance decodes: give at least one a prefill or mixed role")
    return roles


def parse_roles(spec: str, num_instances: int) -> list[str]:
    """Each instance's role from `--roles`: "" (all mixed), counts in instance order ("prefill:2,decode:6"), or
    one role per instance ("prefill,decode,decode"). ValueError naming the flag."""
    if not spec:
        return ["mixed"] * num_instances
    roles = _expand_roles(spec)
    if len(roles) != num_instances:
        raise ValueError(f"--roles gives {len(roles)} instance(s) a role, but there are {num_instances}")
    return roles


def roles_count(spec: str) -> int:
    """The instances `spec` gives roles to (0 for "": every instance mixed)."""
    return len(_expand_roles(spec)) if spec else 0


def check_roles_spec(spec: str) -> None:
    """The names and counts of `spec` (the number of instances is checked when the engine knows it)."""
    if spec:
        _expand_roles(spec)


class ConfigError(ValueError):
    """A configuration the runtime cannot serve; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int  # E
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # K
    head_dim: int  # D
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # llama3 / linear rope scaling parameters (unused for "default").
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # Llama `attention_bias`
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral
    architecture: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"model config: rope scaling type {self.rope_type!r} is not implemented "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"kunjax model config: unknown fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Map a Hugging Face `config.json` dict; fail on anything this decoder does not implement."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        arch = None
        for a in archs:
            if a in SUPPORTED_ARCHITECTURES:
                arch = SUPPORTED_ARCHITECTURES[a]
                break
        if arch is None:
            if archs:
                raise ConfigError(
                    f"unsupported architecture {archs}: kunjax serves {sorted(SUPPORTED_ARCHITECTURES)}")
            if model_type in SUPPORTED_ARCHITECTURES.values():
                arch = model_type
            else:
                raise ConfigError(f"unsupported model_type {model_type!r}: kunjax serves "
                                  f"{sorted(set(SUPPORTED_ARCHITECTURES.values()))}")
        hidden_act = hf.get("hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act {hidden_act!r} is not implemented (only silu/SwiGLU)")
        if hf.get("mlp_bias"):
            raise ConfigError("mlp_bias=true is not implemented")
        if arch == "qwen2" and hf.get("use_sliding_window"):
            raise ConfigError("Qwen2 use_sliding_window=true is not implemented")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError("pretraining_tp > 1 is not implemented")

        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // num_heads
        # transformers >= 5 moves rope_theta / rope_scaling into `rope_parameters`; read both spellings.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope scaling type {rope_type!r} is not implemented "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        sliding = hf.get("sliding_window") if arch == "mistral" else None
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=arch != "qwen2" and bool(hf.get("attention_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=int(sliding) if sliding else None,
            architecture=arch,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"{path}: no config.json (expected a Hugging Face model directory)")
        try:
            hf = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from e
        cfg = cls.from_hf(hf)
        gen_path = path / "generation_config.json"
        if gen_path.is_file():
            try:
                gen = json.loads(gen_path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{gen_path}: not valid JSON ({e})") from e
            eos = gen.get("eos_token_id")
            if eos is not None:
                ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
                cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + ids)))
        return cfg


def _opt(default: Any, help: str, aliases: tuple[str, ...] = ()) -> Any:
    """An option field: its flag is `--name-with-dashes`, plus `aliases` (e.g. `--instances`)."""
    return dataclasses.field(default=default, metadata={"help": help, "aliases": aliases})


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is not None and not v > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {v}")


class Options:
    """Base of every concern's options (engine, scheduler, each policy): a frozen dataclass whose fields are CLI
    flags of the same name (dashes for underscores), help text in field metadata, validated in `__post_init__`
    with messages that name the flag. A policy's options live in its own module (`kunjax.policies`)."""

    concern: ClassVar[str] = ""  # CLI help group


@dataclasses.dataclass(frozen=True)
class SchedulerConfig(Options):
    """How a serving unit batches: the step's rows and token budget, its compiled buckets, prefix reuse."""

    concern: ClassVar[str] = "scheduler"
    max_num_seqs: int = _opt(16, "most sequences in one engine step (rows of the batch)")
    max_num_batched_tokens: int = _opt(
        128, "token budget of one engine step: decodes plus prefill chunks (long prompts are chunked)")
    min_token_bucket: int = _opt(16, "smallest padded token count compiled; buckets double up to the budget")
    enable_prefix_caching: bool = _opt(True, "reuse KV blocks of identical prompt prefixes across requests "
                                               "(docs/caching.md)")
    routing: str = _opt("prompt-tree", "which unit a new request joins: prompt-tree (where a global prompt tree "
                                       "says most of its prompt is cached, unless its first token would come "
                                       "--routing-slack-steps later there than elsewhere), least-load (the least "
                                       "KV demand, cached prefixes ignored) or session (a request's session stays "
                                       "on its unit; new sessions least-load); docs/caching.md")
    routing_sync_steps: int = _opt(1, "the prompt tree applies the units' cache events every this many engine "
                                      "steps (its bounded staleness)")
    routing_slack_steps: float = _opt(8.0, "prompt-tree: a unit holding more of the prompt is preferred while its "
                                           "first token is estimated at most this many engine steps later than "
                                           "the soonest unit's")
    prefix_transfer_blocks: int = _opt(0, "with prefix caching: a replica admitting a request copies its cached "
                                          "prompt prefix from another replica that holds at least this many more "
                                          "blocks of it, when the copy is cheaper than recomputing them "
                                          "(kunjax/transfers.py); 0: never")
    prefix_cache_host: bool = _opt(True, "with prefix caching: cached blocks a replica evicts spill to its host "
                                         "tier (--host-kv-bytes, default 4x the device pool) and come back on a "
                                         "hit when that is cheaper than recomputing them (kunjax/hostcache.py)")
    async_scheduling: bool = _opt(False, "overlap the host with the device: schedule and pack a replica's next "
                                         "tick while its current one runs, its decode tokens patched in from the "
                                         "device's sampled ids just before launch, tokens applied one tick late; "
                                         "a step falls back to the serial loop when a policy may act, a pipeline "
                                         "or --roles is involved (kunjax/overlap.py, docs/performance.md)")

    def __post_init__(self) -> None:
        _positive(self, "max_num_seqs", "max_num_batched_tokens", "min_token_bucket", "routing_sync_steps")
        if self.prefix_transfer_blocks < 0:
            raise ConfigError(f"--prefix-transfer-blocks must be >= 0, got {self.prefix_transfer_blocks}")
        if not self.routing_slack_steps >= 0:
            raise ConfigError(f"--routing-slack-steps must be >= 0, got {self.routing_slack_steps}")
        from kunjax.routing import ROUTING_MODES

        if self.routing not in ROUTING_MODES:
            raise ConfigError(f"--routing must be one of {', '.join(ROUTING_MODES)}, got {self.routing!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be >= --max-num-seqs "
                f"({self.max_num_seqs}) so every running sequence can decode in one step")

    def token_buckets(self) -> tuple[int, ...]:
        """Padded token counts compiled ahead of time: powers of two up to the step budget."""
        out: list[int] = []
        b = max(self.min_token_bucket, 1)
        while b < self.max_num_batched_tokens:
            out.append(b)
            b *= 2
        out.append(self.max_num_batched_tokens)
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class EngineConfig(Options):
    """How a model is served: devices, memory, the model context, the attention kernel, and the scheduler's and
    the policy's options (`scheduler`, `policy_options`). Build one from flat options (every flag's name) with
    `kunjax.engine.config_from_kwargs`, which sends each to its concern."""

    concern: ClassVar[str] = "engine"
    num_instances: int | None = _opt(None, "data-parallel instances (model replicas); default: one per --tp devices",
                                     aliases=("--instances",))
    tp: int = _opt(1, "tensor-parallel degree inside an instance (devices per replica)")
    dtype: str = _opt("float32", "weight and KV dtype: float32, bfloat16 or float16 (CPU: float32 is ~3x faster)")
    block_size: int = _opt(16, "tokens per KV-cache block")
    kv_cache_bytes: int | None = _opt(
        None, "KV-cache bytes per device; default: from device memory stats on GPU/TPU, 64 MiB on CPU")
    kv_memory_fraction: float = _opt(0.85, "GPU/TPU: share of device memory for weights + KV cache")
    num_blocks: int | None = _opt(None, "KV blocks per instance, overriding the byte budget")
    max_model_len: int | None = _opt(
        None, "longest sequence (prompt + output); default: min(model max positions, 2048)")
    max_logprobs: int = _opt(20, "most top logprobs a request may ask for (computed every step)")
    seed: int = _opt(0, "seed from which requests without their own seed draw one (reproducible runs)")
    policy: str = _opt("recompute", "memory-overload policy: recompute (preempt the latest arrival, re-prefill "
                       "later), swap (move the victim's KV to host memory, bring it back before new admissions), "
                       "migrate (Llumnix: move running requests' KV to the least loaded instance while they decode), "
                       "layerkv (admit a prefill with only some layer groups on device, the rest on host) "
                       "or kunserve (drop replicated weights into pipeline groups, restore after the burst)")
    host_kv_bytes: int | None = _opt(None, "host-memory KV bytes per instance for what uses the host tier (the "
                                           "swap and layerkv policies, cached prefixes spilled by "
                                           "--prefix-cache-host); default: 4x the instance's device KV pool")
    attention_backend: str = _opt("auto", "paged-attention kernel: auto (the platform's kernel, gpu or tpu, if it "
                                          "passes a self-test on the device at start-up, else the reference; the "
                                          "reference on CPU), reference, gpu (Pallas Mosaic GPU, Hopper), tpu "
                                          "(Pallas Mosaic), or gpu-interpret / tpu-interpret (those kernels in "
                                          "interpret mode, for CPU checks). The kernels have not yet run on "
                                          "hardware; naming one skips the self-test")
    device_memory_bytes: int | None = _opt(
        None, "CPU: simulated per-device memory budget (weights + KV + reserve); the KV pool gets what the weights "
              "leave. GPU/TPU read it from memory stats")
    activation_reserve_bytes: int = _opt(8 * 2**20, "per-device bytes kept free for activations when the KV pool "
                                                     "is sized from a device budget")
    roles: str = _opt("", "prefill/decode disaggregation: each instance's role, prefill (takes new requests, "
                          "computes prompts), decode (takes the requests prefill instances hand over) or mixed (both; "
                          "the default), as counts in instance order (prefill:2,decode:6) or one per instance; "
                          "recompute policy only (kunjax/disagg.py)")
    pd_stream_groups: int = _opt(1, "prefill/decode handoff: 1 sends a request's KV at once after its prefill; "
                                    "G > 1 streams it in G layer groups as the prefill computes them, so only the "
                                    "last group's transfer follows it (priced on simulated time; on one host the "
                                    "copy is made after the tick either way)")
    step_retries: int = _opt(2, "times a request is recomputed after a device failure touched its KV (a retry that "
                                "changes no output) before it ends with an error")
    faults: str = _opt("", "fault injection for tests and drills, off by default: comma-separated "
                           "POINT[@INSTANCE][:after=N][:times=N][:seconds=S] with POINT step, copy, fuse, split or "
                           "slow (kunjax/faults.py, docs/reliability.md); empty: $KUNJAX_FAULTS, if set")
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig, metadata={"nested": True})
    # The policy's own options (its module's `Options` class); None: that policy's defaults.
    policy_options: Options | None = dataclasses.field(default=None, metadata={"nested": True})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        _positive(self, "tp", "block_size", "num_instances", "kv_cache_bytes", "device_memory_bytes",
                  "host_kv_bytes", "pd_stream_groups")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ConfigError(f"--num-blocks must be >= 2, got {self.num_blocks}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ConfigError(f"--kv-memory-fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                              f"got {self.attention_backend!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.activation_reserve_bytes < 0:
            raise ConfigError("--activation-reserve-bytes must be >= 0")
        if not 0 <= self.max_logprobs <= 64:
            raise ConfigError(f"--max-logprobs must be in [0, 64], got {self.max_logprobs}")
        try:
            check_roles_spec(self.roles)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if self.roles and self.policy != "recompute" and any(r in self.roles for r in ("prefill", "decode")):
            raise ConfigError(f"--roles with prefill or decode instances needs --policy recompute, not {self.policy}")
        if self.step_retries < 0:
            raise ConfigError(f"--step-retries must be >= 0, got {self.step_retries}")
        try:
            faults.parse(self.faults)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def resolved_max_model_len(self, model: ModelConfig) -> int:
        n = self.max_model_len or min(model.max_position_embeddings, 2048)
        if n > model.max_position_embeddings:
            raise ConfigError(f"--max-model-len {n} exceeds the model's max_position_embeddings "
                              f"{model.max_position_embeddings}")
        return n

    def max_blocks_per_seq(self, model: ModelConfig) -> int:
        return math.ceil(self.resolved_max_model_len(model) / self.block_size)
