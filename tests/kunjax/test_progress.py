"""Progress for long waits: a tqdm bar on a terminal, plain lines in logs, nothing when turned off; the engine's
warm-up reports each compiled replica and group."""

from __future__ import annotations

import io

import pytest

from kunjax.progress import Progress, mode, warm_up


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal(monkeypatch):
    monkeypatch.delenv("KUNJAX_PROGRESS", raising=False)
    out = io.StringIO()
    with Progress("demo: training", None, "steps", stream=out, interval_s=0.0) as bar:
        bar.update(1, loss="2.5")
        bar.update(1, loss="1.0")
    lines = out.getvalue().splitlines()
    assert lines[0] == "demo: training: started"
    assert any(ln.startswith("demo: training: 1 steps, loss 2.5, ") for ln in lines), lines
    assert lines[-1].startswith("demo: training: 2 steps, loss 1.0 in ")
    assert "\r" not in out.getvalue()


def test_a_bar_on_a_terminal(monkeypatch):
    monkeypatch.delenv("KUNJAX_PROGRESS", raising=False)
    out = _Tty()
    assert mode(out) == "bar"
    bar = Progress("kunjax: compiling", 3, "units", stream=out)
    bar.update(2)
    bar.close("kunjax: compiled")
    text = out.getvalue()
    assert "0/3" in text and "\r" in text  # tqdm's bar, rewritten in place (at most every 0.1 s)
    assert text.rstrip().endswith("kunjax: compiled")


def test_off(monkeypatch):
    monkeypatch.setenv("KUNJAX_PROGRESS", "off")
    out = _Tty()
    with Progress("x", 2, stream=out) as bar:
        bar.update(2)
    assert out.getvalue() == ""


@pytest.mark.parametrize("policy, groups", [("recompute", 0), ("kunserve", 4)])
def test_warm_up_counts_every_replica_and_group(policy, groups, capsys, monkeypatch):
    from kunjax.engine import LLMEngine, config_from_kwargs
    from kunjax.hardware import load_profile
    from kunjax.model_shapes import model_shape

    monkeypatch.setenv("KUNJAX_PROGRESS", "plain")
    engine = LLMEngine(model_shape("llama-3-8b"), config_from_kwargs(num_instances=8, policy=policy),
                       executor="sim", profile=load_profile("h100-sxm"))
    seen = []
    engine.warmup(lambda done, total: seen.append((done, total)))
    total = 8 + groups
    assert seen == [(i, total) for i in range(total + 1)]
    warm_up(engine)
    err = capsys.readouterr().err
    assert "kunjax: compiling: started (0/" in err and f"compiled the steps of {total} instances and groups" in err


def test_a_long_step_is_not_silent(monkeypatch):
    """A step that takes longer than the interval (one compile) still gets its lines: the time keeps ticking."""
    import time

    monkeypatch.delenv("KUNJAX_PROGRESS", raising=False)
    out = io.StringIO()
    bar = Progress("kunjax: compiling", 8, "units", stream=out, interval_s=0.2)
    time.sleep(0.7)  # no update meanwhile
    bar.close()
    lines = out.getvalue().splitlines()
    assert len([ln for ln in lines if ln.startswith("kunjax: compiling: 0/8 units, ")]) >= 2, lines
