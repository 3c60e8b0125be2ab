"""Hardware profiles: the coefficients the cost model (`kunjax.cost_model`) turns a step plan into seconds with.

A profile is one JSON file (`kunjax/profiles/<name>.json`, or any path) describing one device kind and the links
around it. Every coefficient names where it came from in `sources`: a vendor specification, a measurement (what
`kunjax calibrate` fits on the device at hand, or a measurement recorded in this workspace), or an assumption
stated as such. `kind` is "measured" when the throughput and efficiency coefficients were fitted on the device,
"spec" when they come from datasheets.

Coefficients (seconds, bytes, FLOP):
* `peak_flops` per dtype, `hbm_bytes_per_s`, `memory_bytes` — the device;
* `matmul_efficiency`, `matmul_half_tokens` — the share of peak a GEMM of M rows reaches:
  `matmul_efficiency · M / (M + matmul_half_tokens)` (small batches do not fill the machine);
* `memory_efficiency` — the share of `hbm_bytes_per_s` streaming weights reaches; `attention_efficiency` — the
  share a paged-attention read of KV blocks reaches; `attention_reads` — what attention reads per layer: "kv"
  (a paged kernel: each row's own history) or "table" (the pure-JAX reference, the CPU backend: every query
  token of the padded bucket gathers its row's whole block table);
* `link_bytes_per_s`, `link_latency_s` — device-to-device interconnect, per direction (NVLink, ICI);
  `network_bytes_per_s` — between hosts; `host_bytes_per_s`, `host_latency_s` — device to host memory (swap);
* `step_overhead_s` — a tick's fixed cost (dispatch, sampling, host work); `layer_overhead_s` — per layer
  (kernel launches);
* `transition_overhead_s` — the fixed cost of a fuse or split (rebuilding the unit, freeing or allocating);
* `memory_op_overhead_s` — the fixed cost of one memory operation (the executor's gather and scatter programs,
  their dispatch and index uploads), on top of its bytes over the link it uses; charged once, to the device
  that issues it;
* `concurrent_devices` — how many devices' work runs at once: 0 (every one: GPUs, TPUs), or, when the "devices"
  are JAX CPU devices sharing one host's cores, the effective number `kunjax calibrate` fits on the engine's
  steps of one replica per device (1: their ticks take turns).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from kunjax.config import ConfigError

PROFILE_DIR = Path(__file__).parent / "profiles"
KINDS = ("spec", "measured")
ATTENTION_READS = ("kv", "table")


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    name: str
    device: str  # what it describes, for humans
    kind: str  # "spec" | "measured"
    memory_bytes: int
    peak_flops: dict[str, float]  # dtype name -> dense FLOP/s
    hbm_bytes_per_s: float
    matmul_efficiency: float
    matmul_half_tokens: float
    memory_efficiency: float
    attention_efficiency: float
    link_bytes_per_s: float
    link_latency_s: float
    network_bytes_per_s: float
    host_bytes_per_s: float
    host_latency_s: float
    step_overhead_s: float
    layer_overhead_s: float
    transition_overhead_s: float
    memory_op_overhead_s: float = 0.0
    attention_reads: str = "kv"  # "kv" | "table" (see the module docstring)
    concurrent_devices: float = 0  # 0: every device computes at once
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # coefficient -> where it came from

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"profile {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
                raise ConfigError(f"profile {self.name}: {f.name} must be >= 0, got {v}")
        for name in ("hbm_bytes_per_s", "link_bytes_per_s", "network_bytes_per_s", "host_bytes_per_s",
                     "memory_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"profile {self.name}: {name} must be positive")
        for name in ("matmul_efficiency", "memory_efficiency", "attention_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"profile {self.name}: {name} must be in (0, 1], got {getattr(self, name)}")
        if self.attention_reads not in ATTENTION_READS:
            raise ConfigError(f"profile {self.name}: attention_reads must be one of {ATTENTION_READS}, "
                              f"got {self.attention_reads!r}")
        if not self.peak_flops or any(v <= 0 for v in self.peak_flops.values()):
            raise ConfigError(f"profile {self.name}: peak_flops needs a positive FLOP/s per dtype")
        unsourced = [name for name in self.coefficients() if name not in self.sources]
        if unsourced:
            raise ConfigError(f"profile {self.name}: no source for {', '.join(unsourced)}")

    @classmethod
    def coefficients(cls) -> list[str]:
        """The fields that need a source: every field but the name, description, kind and sources."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("name", "device", "kind", "sources")]

    def flops(self, dtype: str) -> float:
        try:
            return self.peak_flops[dtype]
        except KeyError:
            raise ConfigError(f"profile {self.name} has no peak FLOP/s for {dtype} "
                              f"(it has {', '.join(self.peak_flops)})") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HardwareProfile:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(d) - known, {f.name for f in dataclasses.fields(cls)
                                            if f.default is dataclasses.MISSING
                                            and f.default_factory is dataclasses.MISSING} - set(d)
        if unknown or missing:
            raise ConfigError(f"profile {d.get('name', '?')}: unknown fields {sorted(unknown)}, "
                              f"missing fields {sorted(missing)}")
        if "memory_op_overhead_s" not in d:  # a profile written before this coefficient existed
            d = {**d, "sources": {**d.get("sources", {}), "memory_op_overhead_s":
                                  "not in this profile file (written before kunjax measured it): 0"}}
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    def scaled(self, **factors: float) -> HardwareProfile:
        """A copy with throughput coefficients multiplied (sensitivity runs: `scaled(link_bytes_per_s=0.5)`)."""
        changes = {}
        for name, f in factors.items():
            if not hasattr(self, name):
                raise ConfigError(f"profile has no coefficient {name!r}")
            changes[name] = getattr(self, name) * f
        sources = dict(self.sources)
        for name, f in factors.items():
            sources[name] = f"{sources.get(name, '')} (x{f:g} for a sensitivity run)".strip()
        return dataclasses.replace(self, **changes, sources=sources, name=f"{self.name}-scaled")


def bundled_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


PROFILE_ALIASES = {"h100": "h100-sxm", "a100": "a100-80gb", "v5e": "tpu-v5e", "v6e": "tpu-v6e"}


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A bundled profile by name (`bundled_profiles()`, or a short name of `PROFILE_ALIASES`), or a profile JSON
    file (what `kunjax calibrate` wrote)."""
    name = str(name_or_path).lower()
    path = PROFILE_DIR / f"{PROFILE_ALIASES.get(name, name)}.json"
    if not path.is_file():
        path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"unknown hardware profile {str(name_or_path)!r}: give one of "
                          f"{', '.join(bundled_profiles())} (or {', '.join(PROFILE_ALIASES)} for short), or a "
                          f"profile JSON file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    return HardwareProfile.from_dict(data)
