"""Test session setup: 8 simulated CPU devices, set before JAX initialises, and a persistent compile cache."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/kunjax/jax-compile-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_sessionstart(session) -> None:
    """Say, once and before the first dot, why the first minutes may pass without one (the run looks hung)."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller says it
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        from kunjax.demo import default_cache_dir, demo_cache_key

        if not (default_cache_dir() / f"demo-{demo_cache_key()}").is_dir():
            reporter.write_line(f"kunjax: the first tests train the demo model into {default_cache_dir()} (a minute "
                                f"or two, once) and fill the compile cache; a dot appears as each test passes")
