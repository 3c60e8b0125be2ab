"""The CLI: help for every option, bad flags named in the error, and a real generate run on a tiny model."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from kunjax.cli import build_parser
from kunjax.config import EngineConfig, SchedulerConfig
from kunjax.options import parse_bytes
from kunjax.policies.kunserve import KunServeOptions
from kunjax.policies.layerkv import LayerKVOptions
from kunjax.policies.migrate import MigrateOptions
from kunjax.policies.swap import SwapOptions
from tests.helpers import write_tiny_model


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "kunjax", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _subparser(command: str, show_all: bool = False):
    return build_parser(show_all)._subparsers._group_actions[0].choices[command]


def test_help_all_explains_every_engine_and_sampling_option():
    sub = _subparser("generate", show_all=True)
    text = sub.format_help()
    for cls in (EngineConfig, SchedulerConfig, SwapOptions, MigrateOptions, LayerKVOptions, KunServeOptions):
        for f in dataclasses.fields(cls):
            if not f.metadata.get("nested"):
                assert "--" + f.name.replace("_", "-") in text, f.name
    for flag in ("--temperature", "--top-k", "--top-p", "--min-p", "--seed", "--stop", "--stop-token-id",
                 "--max-tokens", "--logprobs", "--model", "--stream"):
        assert flag in text
    for action in sub._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_instances_is_num_instances_for_short():
    parser = build_parser()
    a = parser.parse_args(["bench", "--instances", "4"])
    b = parser.parse_args(["bench", "--num-instances", "4"])
    assert a.num_instances == b.num_instances == 4


@pytest.mark.parametrize("args, message", [
    (["--tp", "0"], "--tp must be positive"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be finite and >= 0"),
    (["--max-num-batched-tokens", "4"], "--max-num-batched-tokens (4) must be >= --max-num-seqs"),
    (["--kv-cache-bytes", "lots"], "--kv-cache-bytes"),
    (["--swap-blocks-per-step", "8"], "--swap-blocks-per-step is an option of --policy swap, not of recompute"),
    (["--model", "/nonexistent/model"], "no such directory"),
])
def test_bad_flags_exit_2_naming_the_flag(args, message):
    res = run_cli("generate", "hello", *args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_parse_bytes():
    assert parse_bytes("64MiB") == 64 * 2**20
    assert parse_bytes("1.5GB") == int(1.5 * 2**30)
    assert parse_bytes("4096") == 4096


def test_generate_on_token_ids(tmp_path):
    model = write_tiny_model(tmp_path / "tiny")
    res = run_cli("generate", "--model", str(model), "--prompt-ids", "5,6,7", "--prompt-ids", "9",
                  "--max-tokens", "4", "--cpu-devices", "2", "--max-model-len", "64", "--min-token-bucket", "16",
                  "--max-num-batched-tokens", "16")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("(length, 4 tokens)") == 2
    assert "2 instance(s)" in res.stderr


def test_serve_help_and_bad_flags():
    sub = build_parser()._subparsers._group_actions[0].choices["serve"]
    for action in sub._actions:
        assert action.help, f"{action.option_strings} has no help"
    for args, message in ((["--port", "70000"], "--port must be in [0, 65535]"),
                          (["--max-queued", "0"], "--max-queued must be positive"),
                          (["--http-port", "-1"], "--http-port must be in [0, 65535]"),
                          (["--chat-template", "no-such-file"], "is neither a file nor a Jinja template"),
                          (["--chat-template", "{% for m in messages %}"], "--chat-template: the chat template "
                                                                          "does not parse")):
        res = run_cli("serve", *args)
        assert res.returncode == 2 and message in res.stderr, res.stderr


def test_help_is_short_shows_choices_and_points_to_help_all():
    text = _subparser("generate").format_help()
    assert len(text.splitlines()) < 100
    assert text.startswith("usage: kunjax generate [options] [PROMPT ...]")
    assert "--policy {recompute,swap,migrate,layerkv,kunserve}" in text
    assert "--dtype {float32,bfloat16,float16}" in text
    assert "--help-all" in text and "--list-demo-prompts" in text
    assert "(default: None)" not in _subparser("generate", show_all=True).format_help()
    assert "--swap-blocks-per-step" not in text  # a policy knob: --help-all
    bench = _subparser("bench").format_help()
    assert len(bench.splitlines()) < 140 and "--trace" in bench and "--think-s" not in bench
    assert "--think-s" in _subparser("bench", show_all=True).format_help()
    # hidden from --help, still accepted
    assert build_parser().parse_args(["generate", "--policy", "swap", "--swap-blocks-per-step", "4"]).policy == "swap"


def test_help_all_prints_every_option():
    res = run_cli("generate", "--help-all")
    assert res.returncode == 0
    assert "--swap-blocks-per-step" in res.stdout and "--remote-transport" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["generate", "--bogus"], "kunjax generate: error: unrecognized arguments: --bogus"),
    (["generate", "x", "--max-tokens", "-3"], "kunjax generate: error: argument --max-tokens: expected an integer "
                                              ">= 1, got '-3'"),
    (["generate", "--policy", "foo"], "kunjax generate: error: argument --policy: invalid choice: 'foo'"),
    (["serve", "--port", "x"], "kunjax serve: error: argument --port: invalid int value: 'x'"),
])
def test_errors_are_one_line_and_a_hint(args, message):
    res = run_cli(*args)
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert lines[0].startswith(message), res.stderr
    assert lines[1] == f"Run 'kunjax {args[0]} --help' for the options, 'kunjax {args[0]} --help-all' for all of them."
    assert len(lines) == 2 and "usage:" not in res.stderr


def test_a_flag_before_the_command_says_the_command_comes_first():
    res = run_cli("--max-tokens", "3")
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "kunjax: error: --max-tokens: the command comes first: kunjax {generate,serve,bench,calibrate} [options]",
        "Run 'kunjax --help' for the options."]


def test_list_demo_prompts_are_the_recitation_openings():
    from kunjax.demo import recitation_prompts

    res = run_cli("generate", "--list-demo-prompts")
    assert res.returncode == 0
    assert res.stdout.splitlines() == [p for p, _ in recitation_prompts()]
