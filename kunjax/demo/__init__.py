"""The built-in demo model: a small Llama that recites the passages of `corpus.txt` exactly.

It is the CLI's default model (`kunjax generate` with no model path) and the oracle of the tests: a prompt
made of a passage's first words must continue, greedily, with the rest of that passage and then `<eos>`
(DESIGN.md §10, "Memorized model"). This module owns where the trained checkpoint lives and how it is made
safely: `ensure_demo_model` trains it once (`kunjax.demo.train`) into a cache directory keyed by a hash of
the corpus and the recipe, under a file lock, into a temporary directory renamed into place — so concurrent
processes (pytest-xdist workers) never see a half-written model, and a changed corpus or recipe retrains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from kunjax.progress import Progress

DEMO_NAME = "demo"
# Bump when the checkpoint layout or the training code changes in a way the hash inputs do not see.
FORMAT_VERSION = 1
_DONE_MARKER = "demo_done.json"


def corpus_text() -> str:
    return resources.files(__package__).joinpath("corpus.txt").read_text(encoding="utf-8")


def memorized_passages() -> list[str]:
    """The passages the demo model recites: one per line of `corpus.txt`."""
    return [line for line in corpus_text().splitlines() if line.strip()]


def recitation_prompts(n_words: int = 8) -> list[tuple[str, str]]:
    """(prompt, expected continuation) per passage: its first `n_words` words, and the rest.

    `prompt + continuation` is the passage; the continuation starts with the space that separates them, and
    the prompt's tokens are a prefix of the passage's tokens (the tokenizer splits before spaces).
    """
    out = []
    for passage in memorized_passages():
        words = passage.split(" ")
        prompt = " ".join(words[:n_words])
        out.append((prompt, passage[len(prompt):]))
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("KUNJAX_CACHE_DIR") or Path.home() / ".cache" / "kunjax")


def demo_cache_key() -> str:
    """Short hash of everything the trained model depends on: corpus, recipe, format version."""
    from kunjax.demo.train import DemoTrainConfig

    payload = json.dumps({"corpus": corpus_text(), "recipe": dataclasses.asdict(DemoTrainConfig()),
                          "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_demo_model(cache_dir: str | Path | None = None, *, log: Callable[[str], None] = print,
                      progress: bool = False) -> Path:
    """Directory of the trained demo checkpoint, training it (≈1–2 min on 2 CPU cores) on first use.

    Cache: `cache_dir`, else `$KUNJAX_CACHE_DIR`, else `~/.cache/kunjax`; the model lives in
    `<cache>/demo-<hash>` where the hash covers the corpus and the training recipe. `progress`: show the training
    as a progress bar on stderr (steps, loss, share recited; `kunjax.progress`) instead of logging each check.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{DEMO_NAME}-{demo_cache_key()}"
    if (target / _DONE_MARKER).is_file():
        return target
    with _locked(root / f".{target.name}.lock"):
        if (target / _DONE_MARKER).is_file():  # another process finished it while we waited
            return target
        from kunjax.demo.train import DemoTrainConfig, train_demo

        # Leftovers of a crashed run (no marker, or a temporary dir): never trust them. Holding the lock, no
        # other process is writing them.
        for stale in [target, *root.glob(f".{target.name}.*")]:
            if stale.is_dir():
                shutil.rmtree(stale)
        log(f"demo: training the demo model into {target} (first use only, about a minute on 2 CPU cores)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        bar = Progress("demo: training", None, "steps") if progress else None
        try:
            result = train_demo(tmp, memorized_passages(), DemoTrainConfig(), log=log,
                                on_step=None if bar is None else lambda fields: bar.update(1, **fields))
            if bar is not None:
                bar.close(f"demo: trained in {result.steps} steps, {result.seconds:.0f}s (loss {result.loss:.4f})")
            (tmp / _DONE_MARKER).write_text(json.dumps(
                {"steps": result.steps, "seconds": round(result.seconds, 1), "loss": result.loss,
                 "min_margin": result.min_margin, "key": demo_cache_key()}))
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            os.replace(tmp, target)
        finally:
            if bar is not None:
                bar.close()
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log(f"demo: model ready at {target}")
    return target
