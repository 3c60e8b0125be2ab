"""Command-line options shared by the `kunjax` commands: flags generated from the options of every concern
(`EngineConfig`, `SchedulerConfig`, each policy's own `Options`: one source of truth for options), model and device
flags, and the messages that name a bad flag.

Owns turning argv into configs and configuring JAX before it initialises; never serves or benchmarks anything
(`kunjax.cli` wires the commands, `kunjax.bench.command` runs the bench).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from pathlib import Path

from kunjax.config import ConfigError, EngineConfig, Options, SchedulerConfig
from kunjax.progress import say

_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'67108864', '64MiB', '1.5GB' -> bytes (binary multiples for both spellings)."""
    m = _BYTES.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 67108864, 64MiB, 2GiB)")
    mult = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[(m.group(2) or "")[:1].lower()]
    return int(float(m.group(1)) * mult)


def _field_type(cls: type, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _flag_fields(cls: type[Options]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("nested")]


def policy_option_classes() -> dict[str, type[Options]]:
    """Each policy's own options class, by policy name (the policies without options left out)."""
    from kunjax import policies

    return {name: cls for name in policies.REGISTRY if (cls := policies.options_class(name)) is not None}


# The engine and scheduler options `--help` shows; `--help-all` shows every option of every concern.
COMMON_ENGINE_FLAGS = ("num_instances", "tp", "dtype", "policy", "max_model_len", "kv_cache_bytes",
                       "device_memory_bytes", "max_num_seqs", "max_num_batched_tokens", "seed")


def _choices() -> dict[str, tuple[str, ...]]:
    """The enumerated options, by field name: the CLI lists and checks their values."""
    from kunjax.config import ATTENTION_BACKENDS, DTYPES, POLICIES
    from kunjax.policies.kunserve import REMOTE_TRANSPORTS
    from kunjax.routing import ROUTING_MODES

    return {"policy": POLICIES, "dtype": DTYPES, "attention_backend": tuple(ATTENTION_BACKENDS),
            "routing": ROUTING_MODES, "remote_transport": tuple(REMOTE_TRANSPORTS)}


def _typed(kind: type, what: str, minimum: float | None) -> typing.Callable[[str], object]:
    """An argparse type: `kind` from the text, at least `minimum`; the message says what may be typed."""
    def convert(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return convert


def int_at_least(minimum: int) -> typing.Callable[[str], object]:
    return _typed(int, f"an integer >= {minimum}", minimum)


def add_engine_flags(parser: argparse.ArgumentParser, show_all: bool = True) -> None:
    """One flag per option of every concern: the engine, the scheduler, and each policy (its flags apply to it
    only; they default to None here so that a flag given for another policy can be refused by name). Without
    `show_all` only `COMMON_ENGINE_FLAGS` appear in `--help`; every flag is accepted either way."""
    concerns: list[tuple[type[Options], bool]] = [(EngineConfig, False), (SchedulerConfig, False)]
    concerns += [(cls, True) for cls in policy_option_classes().values()]
    choices = _choices()
    for cls, of_policy in concerns:
        group = parser.add_argument_group(f"{cls.concern} ({cls.__module__}.{cls.__name__})")
        for f in _flag_fields(cls):
            flags = ("--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ()))
            kind = _field_type(cls, f)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_ = f.metadata.get("help", "") + ("" if default is None else f" (default: {default})")
            if not show_all and f.name not in COMMON_ENGINE_FLAGS:
                help_ = argparse.SUPPRESS
            if kind is bool:
                group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=None if of_policy else default, help=help_)
            elif f.name in choices:
                group.add_argument(*flags, dest=f.name, choices=choices[f.name],
                                   default=None if of_policy else default, help=help_)
            else:
                conv = parse_bytes if f.name.endswith("_bytes") else kind
                group.add_argument(*flags, dest=f.name, type=conv, default=None if of_policy else default,
                                   metavar="BYTES" if conv is parse_bytes else kind.__name__.upper(), help=help_)


def engine_config_from_args(args: argparse.Namespace, policy: str | None = None,
                            allowed_policies: tuple[str, ...] = ()) -> EngineConfig:
    """The `EngineConfig` of the parsed flags, for `policy` (default: `--policy`). A policy flag given for another
    policy is refused by name, unless that policy is in `allowed_policies` (the bench runs several)."""
    from kunjax.engine import config_from_kwargs

    policy = policy or args.policy
    flat = {f.name: getattr(args, f.name) for cls in (EngineConfig, SchedulerConfig) for f in _flag_fields(cls)}
    flat["policy"] = policy
    for name, cls in policy_option_classes().items():
        for f in _flag_fields(cls):
            value = getattr(args, f.name)
            if value is None:
                continue
            if name == policy:
                flat[f.name] = value
            elif name not in allowed_policies:
                raise ConfigError(f"--{f.name.replace('_', '-')} is an option of --policy {name}, not of {policy}")
    return config_from_kwargs(**flat)


def model_flags(p: argparse.ArgumentParser, cpu_devices: int | None = 8, fuse_note: bool = True) -> None:
    """`cpu_devices` None: as many simulated CPU devices as the instances need (`--num-instances` x `--tp`, one
    instance unless told), for `generate`, where several replicas on one CPU's cores only cost time (each reads
    all the weights for its few rows, and they contend for the same cores: `docs/performance.md`); the elastic
    demo (`serve`, `bench`) keeps 8, so that replicas can fuse (`fuse_note`: say so in the help)."""
    p.add_argument("--model", default="demo", metavar="DIR",
                   help="Hugging Face model directory, kunjax checkpoint directory, or 'demo' (default)")
    if cpu_devices is None:
        p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                       help="simulated CPU devices when running on CPU (default: what --num-instances x --tp "
                            "need, so one instance; several replicas on one CPU are slower, not faster)")
    else:
        note = (", so that instances can fuse; --cpu-devices 1 --max-num-seqs 64 is faster when they need not"
                if fuse_note else "")
        p.add_argument("--cpu-devices", type=int, default=cpu_devices, metavar="N",
                       help=f"simulated CPU devices when running on CPU (default: {cpu_devices}{note})")
    p.add_argument("--compile-cache-dir", default=str(Path("~/.cache/kunjax/jax-compile-cache").expanduser()),
                   metavar="DIR",
                   help="persistent XLA compilation cache, so later runs skip most of the warm-up compile "
                        "(default: ~/.cache/kunjax/jax-compile-cache; 'none' disables it)")


def time_flags(p: argparse.ArgumentParser) -> None:
    """Simulated time (`kunjax.cost_model`): which executor runs the engine and which clock it is timed on."""
    from kunjax.hardware import bundled_profiles
    from kunjax.model_shapes import SHAPES

    g = p.add_argument_group("simulated time (kunjax.cost_model, kunjax.executor.sim)")
    g.add_argument("--executor", choices=("jax", "sim"), default="jax",
                   help="jax (default): the real model on the devices here; sim: no model and no weights, "
                        "durations from --profile for the model --model-shape, at any scale (--num-instances, "
                        "--tp), deterministic")
    g.add_argument("--clock", choices=("wall", "simulated"), default="wall",
                   help="wall (default): time as measured here; simulated: the real model and its tokens, but time "
                        "advanced by --profile's cost model, so this machine shows the profiled device's schedule "
                        "(implied by --executor sim)")
    g.add_argument("--profile", default=None,
                   help=f"hardware profile for simulated time: {', '.join(bundled_profiles())}, or a profile JSON "
                        f"file (default with simulated time: h100-sxm)")
    g.add_argument("--model-shape", default=None,
                   help=f"model shape whose time is modelled, no weights: {', '.join(SHAPES)}, or a Hugging Face "
                        f"config.json; --executor sim: the model simulated (default: --model's config.json, else "
                        f"llama-3-8b); --clock simulated: default the --model's own shape")


def time_settings(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """(executor, profile or None, model shape or None) from the time flags; a bad combination exits 2."""
    from kunjax.hardware import load_profile
    from kunjax.model_shapes import model_shape

    executor = getattr(args, "executor", "jax")
    simulated = executor == "sim" or getattr(args, "clock", "wall") == "simulated"
    profile_name, shape_name = getattr(args, "profile", None), getattr(args, "model_shape", None)
    if not simulated:
        for flag, v in (("--profile", profile_name), ("--model-shape", shape_name)):
            if v is not None:
                parser.error(f"{flag} needs simulated time (--executor sim or --clock simulated)")
        return executor, None, None
    try:
        profile = load_profile(profile_name or "h100-sxm")
    except ConfigError as e:
        parser.error(f"--profile: {e}")
    shape, flag = None, "--model-shape"
    if executor == "sim" and shape_name is None and getattr(args, "model", "demo") != "demo":
        shape_name, flag = args.model, "--model"  # no weights are loaded: its config.json gives the shape
    if shape_name is not None or executor == "sim":
        try:
            shape = model_shape(shape_name or "llama-3-8b")
        except ConfigError as e:
            parser.error(f"{flag}: {e}")
    return executor, profile, shape


def configure_jax(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Simulated CPU devices and the compile cache, set before JAX initialises; returns the `jax` module."""
    if args.cpu_devices is None:  # generate's default: the devices the instances need (one, unless told)
        from kunjax.config import roles_count

        instances = getattr(args, "num_instances", None) or roles_count(getattr(args, "roles", "") or "") or 1
        args.cpu_devices = instances * max(getattr(args, "tp", 1) or 1, 1)
    if args.cpu_devices < 1:
        parser.error(f"--cpu-devices must be positive, got {args.cpu_devices}")
    from kunjax import multihost

    spec = multihost.spec_from_args(parser, args)  # bad launch flags exit before anything starts
    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.compile_cache_dir.lower() != "none":
        jax.config.update("jax_compilation_cache_dir", args.compile_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if spec is not None:
        join_cluster(parser, spec)
    return jax


def join_cluster(parser: argparse.ArgumentParser, spec) -> None:
    """With --coordinator: join the multi-host group (`kunjax.multihost`) before JAX's backends start. A follower
    (process id > 0) spends the rest of its life replaying the leader's executor calls, then exits here; the
    leader goes on, and tells the followers to stop when it exits."""
    import atexit

    from kunjax import multihost

    if multihost.current() is not None:
        return
    print(f"kunjax: joining the group at {spec.coordinator} (waits for every process)", file=sys.stderr, flush=True)
    try:
        cluster = multihost.initialize(spec)
    except (RuntimeError, ValueError) as e:  # no cluster found for 'auto', the coordinator unreachable, ...
        parser.error(f"--coordinator {spec.coordinator}: could not join the group: {e}")
    if not cluster.is_leader:
        sys.exit(multihost.follow(cluster))
    print(f"kunjax: process 0 of {cluster.n} (the leader): serving every process's devices", file=sys.stderr,
          flush=True)

    def leave() -> None:
        cluster.send([("stop",)])
        cluster.close()

    atexit.register(leave)


def make_engine(parser: argparse.ArgumentParser, args: argparse.Namespace, ecfg):
    """Configure JAX (devices, compile cache) before it initialises, then load the model; bad values exit 2."""
    from kunjax.config import ConfigError

    executor, profile, shape = time_settings(parser, args)
    say(f"kunjax: loading {'the model shape' if executor == 'sim' else 'model ' + str(args.model)} ...")
    jax = configure_jax(parser, args)
    from kunjax.engine import LLMEngine

    try:
        if executor == "sim":
            engine = LLMEngine(shape, ecfg, executor="sim", profile=profile)
        else:
            engine = LLMEngine(args.model, ecfg, profile=profile, time_shape=shape)
    except (ConfigError, ValueError) as e:
        parser.error(flag_message(str(e)))
    cfg = engine.model_config
    where = (f"simulated {profile.name} ({profile.kind} profile)" if executor == "sim"
             else jax.devices()[0].platform + (f", time modelled on {profile.name}" if profile else ""))
    print(f"kunjax: model {engine.model_path or 'shape only, no weights'} ({cfg.architecture}, {cfg.num_layers} "
          f"layers) on {engine.num_instances} instance(s) x tp {ecfg.tp}, {where}; loaded in "
          f"{engine.load_seconds:.1f}s", file=sys.stderr)
    return engine


def flag_message(msg: str) -> str:
    """Name the flag in a validation message that names a field ("top_p must ..." -> "--top-p must ...")."""
    m = re.match(r"^([a-z_]+) (must|are|is)", msg)
    return f"--{m.group(1).replace('_', '-')}{msg[len(m.group(1)):]}" if m else msg


