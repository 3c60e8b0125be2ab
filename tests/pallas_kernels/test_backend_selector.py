"""`resolve_backend`: `auto` picks the platform's kernel only after it passes a self-test on the device, falls back
to the reference (with a warning) when the kernel is wrong or fails to compile, runs the self-test once per
process and platform, and leaves explicitly named backends alone. On CPU `auto` is the `cpu` backend.

The GPU/TPU path is exercised on CPU by pretending the devices are GPUs and substituting the kernel."""

from __future__ import annotations

import logging

import jax
import pytest

import pallas_kernels
from kunjax.config import ATTENTION_BACKENDS, ConfigError
from kunjax.engine import config_from_kwargs
from pallas_kernels.paged_attention import reference


@pytest.fixture
def fake_gpu(monkeypatch):
    """Devices report platform "gpu"; `kernel` (set by the test) stands in for the GPU backend."""
    monkeypatch.setattr(pallas_kernels, "_self_tests", {})
    monkeypatch.setattr(pallas_kernels, "_platform", lambda device: "gpu")
    state = {"kernel": None, "calls": 0}
    real = pallas_kernels.paged_attention

    def dispatch(*args, backend="auto", **kwargs):
        if backend == "gpu":
            state["calls"] += 1
            return state["kernel"](*args, **kwargs)
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(pallas_kernels, "paged_attention", dispatch)
    return state


def test_auto_is_the_cpu_backend_on_cpu(monkeypatch):
    monkeypatch.setattr(pallas_kernels, "_self_tests", {})
    assert pallas_kernels.resolve_backend("auto", jax.devices()) == "cpu"
    assert pallas_kernels._self_tests == {}  # no self-test on CPU


@pytest.mark.parametrize("name", ["reference", "cpu", "gpu", "tpu", "gpu-interpret", "tpu-interpret"])
def test_named_backends_are_used_as_is(name, fake_gpu):
    assert pallas_kernels.resolve_backend(name, jax.devices()[:1]) == name
    assert fake_gpu["calls"] == 0


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="attention backend"):
        pallas_kernels.resolve_backend("cuda", jax.devices())


@pytest.mark.timeout(120)
def test_a_correct_kernel_is_accepted_once_per_platform(fake_gpu):
    fake_gpu["kernel"] = reference.paged_attention
    assert pallas_kernels.resolve_backend("auto", jax.devices()[:2]) == "gpu"
    calls = fake_gpu["calls"]
    assert calls == 2  # float32 and bfloat16
    assert pallas_kernels.resolve_backend("auto", jax.devices()[2:4]) == "gpu"
    assert fake_gpu["calls"] == calls  # cached


@pytest.mark.timeout(120)
def test_a_kernel_with_wrong_values_is_rejected(fake_gpu, caplog):
    def off_by_a_little(*args, **kwargs):
        out, lse = reference.paged_attention(*args, **kwargs)
        return out * 1.01, lse

    fake_gpu["kernel"] = off_by_a_little
    with caplog.at_level(logging.WARNING, logger="pallas_kernels"):
        assert pallas_kernels.resolve_backend("auto", jax.devices()[:1]) == "reference"
    assert "failed its self-test" in caplog.text and "float32" in caplog.text


@pytest.mark.timeout(120)
def test_a_kernel_that_only_misses_empty_rows_is_rejected(fake_gpu):
    def no_neg_inf(*args, **kwargs):
        out, lse = reference.paged_attention(*args, **kwargs)
        return out, jax.numpy.where(jax.numpy.isneginf(lse), 0.0, lse)

    fake_gpu["kernel"] = no_neg_inf
    assert pallas_kernels.resolve_backend("auto", jax.devices()[:1]) == "reference"
    assert "nothing to attend" in pallas_kernels._self_tests[("gpu", "gpu")]


@pytest.mark.timeout(120)
def test_a_kernel_that_fails_to_compile_is_rejected(fake_gpu):
    def broken(*args, **kwargs):
        raise NotImplementedError("Mosaic GPU lowering failed")

    fake_gpu["kernel"] = broken
    assert pallas_kernels.resolve_backend("auto", jax.devices()[:1]) == "reference"
    assert "NotImplementedError" in pallas_kernels._self_tests[("gpu", "gpu")]


def test_config_accepts_every_backend_and_rejects_others():
    assert ATTENTION_BACKENDS == pallas_kernels.BACKENDS
    for name in ATTENTION_BACKENDS:
        assert config_from_kwargs(attention_backend=name).attention_backend == name
    with pytest.raises(ConfigError, match="--attention-backend"):
        config_from_kwargs(attention_backend="triton")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kernel", ["gpu-interpret", "tpu-interpret"])
def test_the_real_kernels_pass_the_self_test_in_interpret_mode(kernel):
    """The self-test batch through the actual kernels (~40 s each in interpret mode on 2 cores)."""
    assert pallas_kernels._self_test(kernel, jax.devices()[0]) is None
