"""`kunjax` command line. Engine flags are generated from `EngineConfig` (one source of truth for options).

    kunjax generate                                   # the built-in demo model on 8 simulated CPU devices
    kunjax generate "Every evening at dusk, Marta climbed the one" --max-tokens 40   # a prompt the demo knows
    kunjax generate --list-demo-prompts               # the openings the demo model continues
    kunjax generate --model ~/models/Llama-3.2-1B --tp 2 "Hello"

Bad flags and values exit with status 2 and one line naming the flag, then a hint to `--help` (the common
options) and `--help-all` (every option); nothing is half-run. Waits show progress on stderr (`kunjax.progress`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path

from kunjax import multihost
from kunjax.multihost import add_cluster_flags
from kunjax.options import (
    add_engine_flags,
    engine_config_from_args,
    flag_message,
    int_at_least,
    make_engine,
    model_flags,
    time_flags,
)
from kunjax.progress import CompileProgress, warm_up


class KunjaxParser(argparse.ArgumentParser):
    """argparse with errors a user can act on: one line naming the flag, then where to look, and no usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        more = f", '{self.prog} --help-all' for all of them" if "--help-all" in self._option_string_actions else ""
        self.exit(2, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for the options{more}.\n")


class _HelpAll(argparse.Action):
    """`--help-all`: the help of this command with every engine, scheduler and policy option."""

    def __init__(self, option_strings: list[str], dest: str, command: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.command = command

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        build_parser(show_all=True)._subparsers._group_actions[0].choices[self.command].print_help()
        parser.exit()


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (kunjax.SamplingParams)")
    g.add_argument("--max-tokens", type=int_at_least(1), default=48, metavar="N",
                   help="most tokens to generate per prompt (default: 48)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="softmax temperature; 0 = greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the k most likely tokens; 0 = off")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass in (0, 1]; 1 = off")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens below min-p x the top probability")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string (repeatable); the output ends before it")
    g.add_argument("--stop-token-id", action="append", type=int_at_least(0), default=None, metavar="ID",
                   help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--logprobs", type=int_at_least(0), default=None, metavar="N",
                   help="print the top-N logprobs of each generated token")


def _help_all(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--help-all", action=_HelpAll, command=command,
                   help="show every option, the engine's, scheduler's and each policy's knobs included")


def build_parser(show_all: bool = False) -> argparse.ArgumentParser:
    """The `kunjax` parser; `show_all`: every engine option in `--help` (what `--help-all` prints)."""
    parser = KunjaxParser(prog="kunjax", description="LLM serving runtime on JAX/XLA (KunServe). Run "
                                                     "'kunjax COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser(
        "generate", help="generate text for prompts", usage="%(prog)s [options] [PROMPT ...]",
        description="Generate continuations for prompts with continuous batching over all instances. With no "
                    "prompt, the demo model recites the openings of its memorized passages; it knows only those "
                    "(--list-demo-prompts), any other prompt gets noise.")
    _help_all(gen, "generate")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT",
                     help="prompt texts (default: the demo's recitation prompts)")
    gen.add_argument("--list-demo-prompts", action="store_true",
                     help="print the openings the demo model continues (one per line) and exit")
    gen.add_argument("--prompt-ids", action="append", default=None, metavar="IDS",
                     help="a prompt as comma-separated token ids (repeatable)")
    gen.add_argument("--stream", action=argparse.BooleanOptionalAction, default=False,
                     help="print text as it is generated (one prompt at a time is clearest)")
    gen.add_argument("--server", default=None, metavar="HOST:PORT",
                     help="send the prompts to a running `kunjax serve` instead of loading a model here")
    gen.add_argument("--auth-token-file", type=Path, default=None, metavar="FILE",
                     help="with --server: file holding the server's bearer token")
    gen.add_argument("--tls-ca", type=Path, default=None, metavar="FILE",
                     help="with --server: PEM CA (or self-signed certificate) to verify a TLS server with")
    model_flags(gen, cpu_devices=None)
    _sampling_flags(gen)
    add_engine_flags(gen, show_all)
    gen.set_defaults(handler=cmd_generate, subparser=gen)

    srv = sub.add_parser(
        "serve", help="serve the model over gRPC (and the OpenAI HTTP API with --http-port)",
        usage="%(prog)s [options]",
        description="Serve kunjax.serving.v2.KunjaxService (plus grpc.health.v1 and reflection), and with "
                    "--http-port the OpenAI-compatible HTTP API, until SIGINT or SIGTERM; then stop admitting, let "
                    "in-flight requests finish for --grace-s, abort the rest.")
    _help_all(srv, "serve")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, local only)")
    srv.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one (default 50051)")
    srv.add_argument("--max-queued", type=int, default=1024,
                     help="most requests in flight; beyond it new ones get RESOURCE_EXHAUSTED (default 1024)")
    srv.add_argument("--auth-token-file", type=Path, default=None,
                     help="require 'authorization: Bearer <token>' on every RPC except health and reflection, with "
                          "the token read from this file (default: no auth)")
    srv.add_argument("--tls-cert", type=Path, default=None,
                     help="PEM certificate chain; with --tls-key, serve over TLS (default: plaintext)")
    srv.add_argument("--tls-key", type=Path, default=None, help="PEM private key for --tls-cert")
    srv.add_argument("--metrics-port", type=int, default=None,
                     help="serve Prometheus metrics over HTTP on this port; 0 picks a free one (default: off)")
    srv.add_argument("--metrics-host", default="127.0.0.1",
                     help="address of the metrics endpoint (default: 127.0.0.1, local only)")
    srv.add_argument("--http-port", type=int, default=None,
                     help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                          "/v1/models, /health, /metrics) on this port, with the same auth token, TLS and limits; "
                          "0 picks a free one (default: off)")
    srv.add_argument("--http-host", default="127.0.0.1",
                     help="address of the HTTP API (default: 127.0.0.1, local only)")
    srv.add_argument("--served-model-name", default=None,
                     help="the model id the HTTP API lists and answers to (default: the --model value)")
    srv.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                     help="Jinja chat template for /v1/chat/completions (a file, or the template text itself), "
                          "instead of the model's own from tokenizer_config.json; the demo model has none")
    srv.add_argument("--grace-s", type=float, default=10.0,
                     help="on shutdown, seconds in-flight requests get to finish before they are aborted")
    model_flags(srv)
    add_cluster_flags(srv, show_all)
    add_engine_flags(srv, show_all)
    srv.set_defaults(handler=cmd_serve, subparser=srv)

    from kunjax.bench.command import add_bench_arguments, cmd_bench

    bench = sub.add_parser(
        "bench", help="replay a workload against several policies and compare them", usage="%(prog)s [options]",
        description="Replay a trace (or a synthetic workload) open loop against each of --policies on identical "
                    "inputs, in this process or against a `kunjax serve` (--server); write OUT/summary.json, "
                    "per-request and timeline CSVs and plots, and print the table. By default the workload is "
                    "fitted to the machine: its burstiest window, time-scaled so the peak KV demand is twice the "
                    "instances' KV capacity.")
    add_bench_arguments(bench, show_all)
    _help_all(bench, "bench")
    model_flags(bench)
    add_cluster_flags(bench, show_all)
    time_flags(bench)
    add_engine_flags(bench, show_all)
    bench.set_defaults(handler=lambda p, a: cmd_bench(p, a, remote_target=_grpc_target), subparser=bench)

    from kunjax.calibrate import add_calibrate_arguments, cmd_calibrate

    cal = sub.add_parser(
        "calibrate", help="measure the engine's steps on this device and fit a hardware profile",
        usage="%(prog)s [options]",
        description="Run the real engine's compiled steps over a grid of batch sizes, contexts and prefill "
                    "chunks on the device at hand (CPU, GPU or TPU), fit the cost model's coefficients on 70% "
                    "of them, report the error on the rest, and write the hardware profile JSON that "
                    "`kunjax bench --profile FILE` simulates time with.")
    _help_all(cal, "calibrate")
    add_calibrate_arguments(cal)
    model_flags(cal, fuse_note=False)
    cal.set_defaults(handler=cmd_calibrate, subparser=cal)
    return parser


def cmd_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from kunjax.config import ConfigError
    from kunjax.sampling_params import SamplingParams

    try:
        ecfg = engine_config_from_args(args)
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, stop=args.stop, stop_token_ids=args.stop_token_id,
            ignore_eos=args.ignore_eos, logprobs=args.logprobs)
        prompt_ids = [[int(t) for t in p.split(",") if t.strip()] for p in args.prompt_ids or []]
    except (ConfigError, ValueError) as e:
        parser.error(flag_message(str(e)))

    if args.list_demo_prompts:
        from kunjax.demo import recitation_prompts

        print("\n".join(p for p, _ in recitation_prompts()))
        return 0
    prompts: list = list(args.prompts) + prompt_ids
    if args.server is not None:
        return _generate_remote(parser, args, prompts, params)
    if args.model == "demo":
        _note_unknown_demo_prompts(args.prompts)
    engine = make_engine(parser, args, ecfg)
    if not prompts:
        if args.model != "demo":
            parser.error("give at least one prompt (positional text or --prompt-ids)")
        from kunjax.demo import recitation_prompts

        prompts = [p for p, _ in recitation_prompts()[:8]]
    warm_up(engine)
    submitted: list[str] = []
    try:
        for p in prompts:
            submitted.append(engine.add_request(p, params))
    except ValueError as e:
        parser.error(f"prompt {len(submitted)}: {e}")
    t0 = time.perf_counter()
    finished = {}
    n_tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            n_tokens += len(out.outputs[0].delta_token_ids)
            if args.stream and out.outputs[0].delta_text:
                print(out.outputs[0].delta_text, end="", flush=True)
            if out.finished:
                finished[out.request_id] = out
                if args.stream:
                    print(f"  [{out.request_id}: {out.outputs[0].finish_reason}]", flush=True)
    dt = time.perf_counter() - t0
    if not args.stream:
        for rid in submitted:
            out = finished[rid]
            shown = out.prompt if out.prompt is not None else str(out.prompt_token_ids)
            body = out.text if engine.tokenizer is not None else str(out.token_ids)
            print(f"--- {rid} ({out.outputs[0].finish_reason}, {len(out.token_ids)} tokens)")
            print(f"{shown}\033[1m{body}\033[0m" if sys.stdout.isatty() else f"{shown}|{body}")
            if args.logprobs is not None and out.outputs[0].logprobs:
                for tok, lp in zip(out.token_ids, out.outputs[0].logprobs, strict=True):
                    print(f"    {tok}: {lp}")
    print(f"kunjax: {_plural(len(submitted), 'request')}, {_plural(n_tokens, 'token')} in {dt:.2f}s "
          f"({n_tokens / max(dt, 1e-9):.1f} tok/s)", file=sys.stderr)
    return 0


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _note_unknown_demo_prompts(prompts: Sequence[str]) -> None:
    """The demo model only recites its corpus: say so when a prompt is not the start of one of its passages."""
    from kunjax.demo import memorized_passages

    passages = memorized_passages()
    for p in prompts:
        if not any(passage.startswith(p) for passage in passages):
            print(f"kunjax: note: the demo model only continues the openings of its {len(passages)} memorized "
                  f"passages, and {p[:40]!r} is not one, so expect noise; 'kunjax generate --list-demo-prompts' "
                  f"lists them", file=sys.stderr)
            return


def _generate_remote(parser: argparse.ArgumentParser, args: argparse.Namespace, prompts: list, params) -> int:
    """`kunjax generate --server`: the same sampling flags, sent over gRPC; one prompt after another."""
    import grpc

    from serving.client import FINISH_REASON_NAMES, KunjaxClient

    if not prompts:
        parser.error("give at least one prompt (positional text or --prompt-ids) with --server")
    try:
        token = args.auth_token_file.read_text().strip() if args.auth_token_file is not None else None
    except OSError as e:
        parser.error(f"--auth-token-file: {e}")
    sampling = {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_k": params.top_k,
                "top_p": params.top_p, "min_p": params.min_p, "stop": list(params.stop),
                "stop_token_ids": list(params.stop_token_ids), "ignore_eos": params.ignore_eos,
                "logprobs": params.logprobs}
    with KunjaxClient(args.server, timeout_s=None, auth_token=token, tls_ca=args.tls_ca) as client:
        for i, prompt in enumerate(prompts):
            ids: list[int] = []
            text, reason = "", ""
            try:
                for resp in client.generate(prompt, **sampling):
                    ids.extend(resp.token_ids)
                    text += resp.text
                    if args.stream:
                        print(resp.text, end="", flush=True)
                    if resp.finish_reason:
                        reason = FINISH_REASON_NAMES[resp.finish_reason]
            except grpc.RpcError as e:
                print(f"kunjax: prompt {i}: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
            if args.stream:
                print(f"  [{reason}]")
            else:
                print(f"--- {i} ({reason}, {len(ids)} tokens)")
                print(f"{prompt}|{text or ids}")
    return 0


def cmd_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import signal
    import threading

    from kunjax.config import ConfigError

    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queued < 1:
        parser.error(f"--max-queued must be positive, got {args.max_queued}")
    if args.grace_s < 0:
        parser.error(f"--grace-s must be >= 0, got {args.grace_s}")
    if args.metrics_port is not None and not 0 <= args.metrics_port < 65536:
        parser.error(f"--metrics-port must be in [0, 65535], got {args.metrics_port}")
    if args.http_port is not None and not 0 <= args.http_port < 65536:
        parser.error(f"--http-port must be in [0, 65535], got {args.http_port}")
    chat_template = _chat_template_arg(parser, args.chat_template)
    token = None
    if args.auth_token_file is not None:
        try:
            token = args.auth_token_file.read_text().strip()
        except OSError as e:
            parser.error(f"--auth-token-file: {e}")
    try:
        ecfg = engine_config_from_args(args)
    except (ConfigError, ValueError) as e:
        parser.error(flag_message(str(e)))
    engine = make_engine(parser, args, ecfg)
    from kunjax.engine_thread import EngineThread
    from serving.server import serve

    cluster = multihost.current()
    # compiles on its thread; health flips after
    runtime = EngineThread(engine, max_queued=args.max_queued, freeze_gc=True,
                           warmup_progress=CompileProgress(len(engine.replica_shape.buckets)),
                           on_fatal=cluster.lose if cluster is not None else None)
    try:
        handle = serve(runtime, args.host, args.port, auth_token=token, tls_cert=args.tls_cert, tls_key=args.tls_key,
                       metrics_port=args.metrics_port, metrics_host=args.metrics_host, http_port=args.http_port,
                       http_host=args.http_host, model_name=args.served_model_name or str(args.model),
                       chat_template=chat_template)
    except ValueError as e:
        runtime.shutdown(0)
        parser.error(str(e).replace("tls_", "--tls-").replace("auth_token", "--auth-token-file"))
    except OSError as e:
        runtime.shutdown(0)
        parser.error(f"--host/--port/--metrics-port/--http-port: {e}")
    print(f"kunjax: listening on {args.host}:{handle.port}{' with TLS' if args.tls_cert else ''}; health turns "
          f"SERVING once the warm-up compiles finish", file=sys.stderr, flush=True)
    if handle.http_port is not None:
        print(f"kunjax: OpenAI HTTP API on http{'s' if args.tls_cert else ''}://{args.http_host}:{handle.http_port}/v1 "
              f"(model {args.served_model_name or args.model!s})", file=sys.stderr, flush=True)
    if handle.metrics_port is not None:
        print(f"kunjax: metrics on http://{args.metrics_host}:{handle.metrics_port}/metrics", file=sys.stderr,
              flush=True)
    if cluster is not None:  # a lost process: requests fail with UNAVAILABLE, health NOT_SERVING, then exit 75
        def on_lost(reason: str) -> None:
            runtime.fatal(reason)
            handle.begin_drain()
            time.sleep(1.0)  # the streams' final messages go out

        cluster.on_lost(on_lost)
    stop, hurry = threading.Event(), threading.Event()

    def on_signal(*_) -> None:
        if stop.is_set():  # a second SIGINT or SIGTERM ends the drain now
            hurry.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    while not stop.is_set():
        if handle.wait_serving(0.2):
            print(f"kunjax: ready on {args.host}:{handle.port} (health SERVING); Ctrl-C stops", file=sys.stderr,
                  flush=True)
            break
    stop.wait()
    handle.begin_drain()  # health NOT_SERVING first: load balancers stop sending work here
    print(f"kunjax: shutting down (grace {args.grace_s:.0f}s; a second SIGINT/SIGTERM aborts what is left)",
          file=sys.stderr, flush=True)
    runtime.shutdown(args.grace_s, cut_short=hurry)  # stop admitting, finish or abort in-flight requests
    handle.stop(grace=1.0)
    return 0


def _chat_template_arg(parser: argparse.ArgumentParser, value: str | None) -> str | None:
    """`--chat-template`: the text of a file, or the template itself when it is not a file but looks like one."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"--chat-template: cannot read {value}: {e}")
    if "{{" in value or "{%" in value:
        from kunjax.chat_template import ChatTemplateError, render_chat

        try:  # a syntax error fails here, not on the first chat request
            render_chat(value, [{"role": "user", "content": "hi"}])
        except ChatTemplateError as e:
            if "does not parse" in str(e):
                parser.error(f"--chat-template: {e}")
        return value
    parser.error(f"--chat-template: {value!r} is neither a file nor a Jinja template")


def _grpc_target(address: str, **kwargs):
    """`kunjax bench --server`: the replay's target over gRPC (the CLI is what wires `serving` to `kunjax`)."""
    from serving.bench_target import GrpcTarget

    return GrpcTarget(address, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        parser.error(f"{argv[0]}: the command comes first: kunjax {{generate,serve,bench,calibrate}} [options]")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's own parser, whose usage and options they were meant for
        args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args.subparser, args)
    except BrokenPipeError:  # stdout closed early (`| head`): not an error; Python would still flush it at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
