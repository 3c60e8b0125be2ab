"""The README's examples, run as written: every ```bash and ```python block, in order, as a new user would.

One session copies the repository's tracked files into a temporary directory (a fresh clone), with an empty home
directory, and runs the blocks there in README order: the first block is the README's install command, so every
later block runs in the virtual environment it made (`.venv/`), with the demo model trained and the compile cache
filled by the first run, exactly as for a user. A ```python block runs with `.venv/bin/python`. A block must
exit 0; a ```text block right after it is its expected stdout, line by line (a line `...` matches any lines).

Directives, an HTML comment on the line before a block (invisible on GitHub):

* `<!-- readme-test: skip: REASON -->` — not run here, and why (e.g. it needs a GPU or a downloaded checkpoint).
* `<!-- readme-test: server -->` — a command that serves until stopped: started in the background, ready once it
  prints `kunjax: ready on`, stopped with SIGINT (and must then exit 0) at the end of its README section.

pip reuses the machine's package cache (`PIP_CACHE_DIR`), so the install downloads nothing already fetched; the
rest of the home directory is empty. Slow (about 15 minutes on 2 cores), and run by CI like every test.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(?P<kind>skip|server)\s*(?::\s*(?P<why>.*?))?\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclasses.dataclass
class Block:
    line: int  # 1-based line of the opening fence
    section: str  # the `## ` heading it is under
    lang: str  # bash or python
    code: str
    skip: str | None = None  # the reason, when not run
    server: bool = False
    expected: str | None = None  # the ```text block after it: its stdout

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.section}): {self.code.strip().splitlines()[0][:80]}"


def readme_blocks(text: str) -> list[Block]:
    """The README's runnable blocks, with their directives and expected outputs."""
    lines = text.splitlines()
    blocks: list[Block] = []
    section, i, pending = "", 0, None
    previous_was_block = False
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section, previous_was_block = line[3:].strip(), False
        if m := DIRECTIVE.search(line):
            pending = m
        m = FENCE.match(line)
        if not m:
            if line.strip() and not DIRECTIVE.search(line):
                previous_was_block = False
            i += 1
            continue
        start, lang = i, m.group(1)
        i += 1
        body = []
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        code = "\n".join(body) + "\n"
        if lang == "text" and previous_was_block and blocks:
            blocks[-1].expected = code
        elif lang in ("bash", "python"):
            b = Block(start + 1, section, lang, code)
            if pending is not None:
                b.skip = (pending.group("why") or "no reason given") if pending.group("kind") == "skip" else None
                b.server = pending.group("kind") == "server"
            blocks.append(b)
            previous_was_block = True
        else:
            previous_was_block = False
        pending = None
    return blocks


def match_output(expected: str, actual: str) -> bool:
    """Line by line; a line `...` matches any number of lines."""
    exp, act = expected.rstrip("\n").splitlines(), actual.rstrip("\n").splitlines()
    pattern = "".join(r"(?:.*\n)*?" if e == "..." else re.escape(e) + r"\n" for e in exp)
    return re.fullmatch(pattern, "".join(a + "\n" for a in act)) is not None


def test_readme_blocks_parse_with_directives_and_outputs():
    text = "\n".join([
        "## One", "```bash", "echo hi", "```", "```text", "hi", "```",
        "<!-- readme-test: skip: needs a GPU -->", "```bash", "nvidia-smi", "```",
        "## Two", "<!-- readme-test: server -->", "```bash", "serve", "```", "```python", "print(1)", "```",
        "```json", "{}", "```"])
    blocks = readme_blocks(text)
    assert [(b.section, b.lang, b.code, b.skip, b.server, b.expected) for b in blocks] == [
        ("One", "bash", "echo hi\n", None, False, "hi\n"),
        ("One", "bash", "nvidia-smi\n", "needs a GPU", False, None),
        ("Two", "bash", "serve\n", None, True, None),
        ("Two", "python", "print(1)\n", None, False, None)]
    assert match_output("a\n...\nd\n", "a\nb\nc\nd\n") and match_output("a\n...\n", "a\n")
    assert not match_output("a\nd\n", "a\nb\nd\n")


def test_readme_starts_with_its_install_command_and_every_block_is_run_or_says_why():
    blocks = readme_blocks(README.read_text())
    assert blocks[0].code.startswith("python3 -m venv .venv && .venv/bin/pip install -e .")
    for b in blocks:
        if b.skip is None and b.lang == "bash":
            for cmd in re.findall(r"(?:^|&&|\|)\s*(kunjax|python|pip|jupyter)\b", b.code, re.M):
                pytest.fail(f"{b}: bare `{cmd}` (use .venv/bin/{cmd} as the install made it)")


def _fresh_clone(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


class _Servers:
    def __init__(self):
        self.running: list[tuple[Block, subprocess.Popen, Path]] = []

    def start(self, b: Block, cwd: Path, env: dict[str, str], log: Path, timeout_s: float) -> None:
        err = open(log, "w")  # noqa: SIM115 - the child writes it until stopped
        proc = subprocess.Popen(["bash", "-c", "exec " + b.code.strip()], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        self.running.append((b, proc, log))
        deadline = time.monotonic() + timeout_s
        while "kunjax: ready on" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop_all()
                pytest.fail(f"{b}: the server did not say it was ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop_all(self) -> list[str]:
        failures = []
        for b, proc, log in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            if proc.returncode != 0:
                failures.append(f"{b}: exited {proc.returncode} when stopped:\n{log.read_text()[-3000:]}")
        self.running = []
        return failures


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_readme_example_runs_as_written(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the repository's git checkout (the README is run on a copy of its files)")
    repo, home = tmp_path / "kunjax", tmp_path / "home"
    repo.mkdir()
    home.mkdir()
    _fresh_clone(repo)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "KUNJAX_", "VIRTUAL_ENV",
                                                                        "PYTHON"))}
    env.update(HOME=str(home), JAX_PLATFORMS="cpu",
               PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip"))
    # the venv the README makes, not the one running this test
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.prefix))))
    blocks = readme_blocks((repo / "README.md").read_text())
    servers = _Servers()
    failures: list[str] = []
    section = blocks[0].section
    try:
        for n, b in enumerate(blocks):
            if b.section != section:
                failures += servers.stop_all()
                section = b.section
            if b.skip is not None:
                print(f"skipped {b}: {b.skip}")
                continue
            t0 = time.monotonic()
            if b.server:
                servers.start(b, repo, env, tmp_path / f"server-{n}.log", timeout_s=900)
                print(f"{time.monotonic() - t0:6.1f}s  server ready: {b}")
                continue
            cmd = ["bash", "-e", "-o", "pipefail", "-c", b.code] if b.lang == "bash" else \
                [str(repo / ".venv" / "bin" / "python"), "-c", b.code]
            res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
            print(f"{time.monotonic() - t0:6.1f}s  exit {res.returncode}: {b}")
            if res.returncode != 0:
                failures.append(f"{b}: exit {res.returncode}\n--- stdout\n{res.stdout[-3000:]}\n"
                                f"--- stderr\n{res.stderr[-5000:]}")
            elif b.expected is not None and not match_output(b.expected, res.stdout):
                failures.append(f"{b}: printed\n{res.stdout}\ninstead of what the README shows:\n{b.expected}")
    finally:
        failures += servers.stop_all()
    assert not failures, "\n\n".join(failures)
