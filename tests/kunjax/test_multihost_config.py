"""Multi-host options: the launch flags are checked before anything starts, and what is not built across
processes is refused by name (the loopback runs themselves are in tests/e2e/test_multihost.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kunjax.cli import build_parser, main
from kunjax.config import ConfigError
from kunjax.engine import config_from_kwargs
from kunjax.multihost import Units, check_config
from kunjax.plan import Fuse, Split, UnitShape


@pytest.mark.parametrize(("args", "message"), [
    (["--num-processes", "2", "--process-id", "0"], "--num-processes/--process-id need --coordinator"),
    (["--coordinator", "nohost"], "--coordinator must be HOST:PORT or 'auto'"),
    (["--coordinator", "127.0.0.1:70000", "--num-processes", "2", "--process-id", "0"], "--coordinator must be"),
    (["--coordinator", "127.0.0.1:5000"], "--coordinator HOST:PORT needs --num-processes and --process-id"),
    (["--coordinator", "127.0.0.1:5000", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in [0, 1], got 2"),
    (["--coordinator", "127.0.0.1:5000", "--num-processes", "0", "--process-id", "0"],
     "--num-processes must be positive"),
    (["--coordinator", "auto", "--peer-timeout-s", "0"], "--peer-timeout-s must be positive"),
])
@pytest.mark.parametrize("command", ["serve", "bench"])
def test_bad_launch_flags_exit_2_naming_the_flag(capsys, command, args, message):
    with pytest.raises(SystemExit) as e:
        main([command, *args, "--cpu-devices", "2", "--compile-cache-dir", "none"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _subparser(command: str, show_all: bool = False):
    return build_parser(show_all)._subparsers._group_actions[0].choices[command]


def test_the_launch_flags_are_listed_by_help_all():
    assert "--coordinator" not in _subparser("serve").format_help()
    for command in ("serve", "bench"):
        text = _subparser(command, show_all=True).format_help()
        assert "--coordinator HOST:PORT" in text and "--peer-timeout-s" in text


def test_the_cost_model_executor_does_not_join_a_group(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--executor", "sim", "--coordinator", "auto", "--compile-cache-dir", "none"])
    assert e.value.code == 2
    assert "--executor sim needs no devices" in capsys.readouterr().err


def test_auto_without_a_cluster_launcher_says_so():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for var in [v for v in env if v.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR"))]:
        del env[var]
    r = subprocess.run([sys.executable, "-m", "kunjax", "serve", "--coordinator", "auto", "--cpu-devices", "2"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "--coordinator auto: could not join the group" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(("options", "flag"), [
    ({"policy": "migrate"}, "--policy migrate"),
    ({"roles": "prefill:1,decode:1"}, "--roles"),
    ({"prefix_transfer_blocks": 2}, "--prefix-transfer-blocks"),
])
def test_kv_moves_between_processes_outside_a_group_are_refused_by_name(options, flag):
    with pytest.raises(ConfigError, match=flag):
        check_config(config_from_kwargs(**options))
    check_config(config_from_kwargs(policy="kunserve"))  # what is built passes


def test_units_know_which_processes_a_group_spans_and_who_reports_it():
    units = Units([0, 0, 1, 1])  # instances 0, 1 on process 0; 2, 3 on process 1
    shape = UnitShape(k=2, tp=1, tokens=8, buckets=(8,), seqs=2, max_blocks=4, num_base=8)
    assert not units.spans(0) and units.reporter(0) is None  # the leader computes its own replicas
    assert units.reporter(2) == 1  # a follower's replica: the follower reports its samples
    assert units.track([Fuse(unit=9, members=(1, 2), shape=shape)])  # a fuse waits: the followers go first
    assert units.spans(9) and units.reporter(9) is None
    units.track([Fuse(unit=10, members=(2, 3), shape=shape)])
    assert not units.spans(10) and units.reporter(10) == 1
    units.track([Split(unit=9, members=(1, 2))])
    assert units.processes(9) == set()
