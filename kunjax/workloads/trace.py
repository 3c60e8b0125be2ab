"""Workload records and the trace loaders.

Owns `TraceRequest` / `Workload` (what a replay sends: arrival offsets and token counts, never prompt text) and
reading public LLM-serving traces into them. The format is detected from the file's first line, never from its
name; `.gz` files are read transparently (detected by their magic bytes):

* Azure LLM inference trace 2023 — CSV `TIMESTAMP,ContextTokens,GeneratedTokens`, timestamps like
  `2023-11-16 18:15:46.6805900` (7-digit fraction, UTC);
* Azure LLM inference trace 2024 — the same columns, timestamps with an offset (`... +00:00`);
* BurstGPT — CSV `Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type`,
  timestamps in seconds from the trace start; rows with 0 response tokens are failed requests and are skipped;
* Mooncake — JSON lines `{"timestamp": ms, "input_length": n, "output_length": n, "hash_ids": [...]}`; equal
  hash ids are shared 512-token prompt prefixes (kept as `TraceRequest.prefix_ids`).

Invariants of every `Workload`: requests sorted by arrival, the first at `arrival_s >= 0`; every request has at
least one prompt token and one output token (a loader skips, or raises, and says how many in `notes`). Errors
about a file name the file and the line (`TraceFormatError`), so a CLI can print them without a traceback.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512  # tokens per Mooncake hash id

# Short names for traces that ship with kunjax (`kunjax bench --trace azure-conv`).
BUNDLED_TRACES = {
    "azure-conv": "azure_llm_2023_conv.csv.gz",
    "mooncake": "mooncake_synthetic.jsonl.gz",
}
BUNDLED_DIR = Path(__file__).parent / "traces"


class TraceFormatError(ValueError):
    """A trace file that cannot be read; the message names the file (and the line, where there is one)."""


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds after the workload's start
    prompt_tokens: int  # >= 1
    output_tokens: int  # >= 1
    prefix_ids: tuple[int, ...] = ()  # shared prompt-prefix blocks (Mooncake hash ids); equal ids = equal tokens
    session: str = ""  # the conversation it is a turn of, when known (sent as the request's session id)
    # Closed loop (a conversation's next turn): the index of the turn it continues; replayed, it is sent `think_s`
    # after that turn ends, its prompt that turn's prompt and answer as they were, then its last `new_tokens`.
    follows: int = -1
    think_s: float = 0.0
    new_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Workload:
    """A replayable workload: requests in arrival order and what was done to get them."""

    requests: tuple[TraceRequest, ...]
    source: str  # where the requests came from ("azure-2023 trace at PATH", "synthetic: ...")
    notes: tuple[str, ...] = ()  # every transformation and skip, in order, in words
    prefix_block_tokens: int = 0  # tokens per prefix id (0: the workload has no shared prefixes)

    def __post_init__(self) -> None:
        rs = self.requests
        if any(rs[i].arrival_s > rs[i + 1].arrival_s for i in range(len(rs) - 1)):
            raise ValueError("Workload.requests must be sorted by arrival_s")

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        """Time from the workload's start (0) to its last arrival."""
        return self.requests[-1].arrival_s if self.requests else 0.0

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.requests)

    def derive(self, requests: list[TraceRequest] | tuple[TraceRequest, ...], note: str,
               **changes: object) -> Workload:
        """The same workload with other requests and one more note (requests are sorted here)."""
        reqs = tuple(requests)
        if any(reqs[i].arrival_s > reqs[i + 1].arrival_s for i in range(len(reqs) - 1)):
            reqs = tuple(sorted(reqs, key=lambda r: r.arrival_s))
        return dataclasses.replace(self, requests=reqs, notes=(*self.notes, note), **changes)

    def describe(self) -> dict[str, object]:
        """Size and shape, for summaries."""
        return {"source": self.source, "requests": len(self), "duration_s": round(self.duration_s, 3),
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "notes": list(self.notes)}


# ---- reading ---------------------------------------------------------------------------------------------------
def resolve_trace(name_or_path: str | Path) -> Path:
    """A bundled trace's short name (`azure-conv`, `mooncake`) -> its file; anything else is a path."""
    key = str(name_or_path)
    if key in BUNDLED_TRACES:
        return BUNDLED_DIR / BUNDLED_TRACES[key]
    return Path(name_or_path).expanduser()


def _open_text(path: Path) -> io.TextIOBase:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def load_trace(path: str | Path) -> Workload:
    """Read a trace file (format detected from its first line; `.gz` accepted); see the module docstring."""
    path = resolve_trace(path)
    if not path.is_file():
        hint = f" (bundled traces: {', '.join(BUNDLED_TRACES)})" if len(path.parts) == 1 else ""
        raise TraceFormatError(f"{path}: no such file{hint}")
    try:
        with _open_text(path) as f:
            first = f.readline()
            while first and not first.strip():
                first = f.readline()
            if not first:
                raise TraceFormatError(f"{path}: the file is empty")
            if first.lstrip().startswith("{"):
                return _load_mooncake(path, first, f)
            header = next(csv.reader([first]))
            names = [h.strip().lower() for h in header]
            if {"timestamp", "contexttokens", "generatedtokens"} <= set(names):
                return _load_azure(path, names, f)
            if {"timestamp", "request tokens", "response tokens"} <= set(names):
                return _load_burstgpt(path, names, f)
            raise TraceFormatError(
                f"{path}: unrecognised trace header {header!r}. Known formats: Azure LLM 2023/2024 "
                f"(TIMESTAMP,ContextTokens,GeneratedTokens), BurstGPT (Timestamp,Session ID,Elapsed time,Model,"
                f"Request tokens,Response tokens,Total tokens,Log Type), Mooncake JSON lines "
                f"({{\"timestamp\", \"input_length\", \"output_length\", \"hash_ids\"}})")
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as e:
        raise TraceFormatError(f"{path}: cannot read: {e}") from e


def _rows(path: Path, names: list[str], f: io.TextIOBase) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {lower-case column: value}) for each non-empty data row."""
    for i, row in enumerate(csv.reader(f), start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < len(names):
            raise TraceFormatError(f"{path}:{i}: expected {len(names)} columns, got {len(row)}")
        yield i, dict(zip(names, row, strict=False))


def _int(path: Path, line: int, column: str, text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        raise TraceFormatError(f"{path}:{line}: column {column!r}: not a number: {text!r}") from None


def _finish(path: Path, fmt: str, raw: list[tuple[float, int, int, tuple[int, ...]]], notes: list[str],
            block_tokens: int = 0) -> Workload:
    """Sort, shift to start at 0, skip requests with no output and raise empty prompts to one token."""
    if not raw:
        raise TraceFormatError(f"{path}: no requests in the trace")
    raw.sort(key=lambda r: r[0])
    t0 = raw[0][0]
    no_output = sum(1 for r in raw if r[2] < 1)
    empty_prompt = sum(1 for r in raw if r[1] < 1 and r[2] >= 1)
    reqs = tuple(TraceRequest(t - t0, max(p, 1), o, pre) for t, p, o, pre in raw if o >= 1)
    if no_output:
        notes.append(f"skipped {no_output} request(s) with 0 output tokens")
    if empty_prompt:
        notes.append(f"raised {empty_prompt} empty prompt(s) to 1 token")
    if not reqs:
        raise TraceFormatError(f"{path}: no request with output tokens")
    notes.insert(0, f"loaded {len(reqs)} requests over {reqs[-1].arrival_s:.1f}s ({fmt})")
    return Workload(requests=reqs, source=f"{fmt} trace {path}", notes=tuple(notes),
                    prefix_block_tokens=block_tokens)


def _load_azure(path: Path, names: list[str], f: io.TextIOBase) -> Workload:
    raw: list[tuple[float, int, int, tuple[int, ...]]] = []
    with_offset = False
    for line, row in _rows(path, names, f):
        stamp = row["timestamp"].strip()
        try:
            when = datetime.fromisoformat(stamp)
        except ValueError:
            raise TraceFormatError(f"{path}:{line}: column 'TIMESTAMP': not a date-time: {stamp!r}") from None
        if when.tzinfo is not None:
            with_offset = True
        else:
            when = when.replace(tzinfo=UTC)  # the 2023 traces are UTC without saying so
        raw.append((when.timestamp(), _int(path, line, "ContextTokens", row["contexttokens"]),
                    _int(path, line, "GeneratedTokens", row["generatedtokens"]), ()))
    fmt = "azure-2024" if with_offset else "azure-2023"
    start = datetime.fromtimestamp(min(r[0] for r in raw), UTC) if raw else None
    notes = [f"trace starts {start:%Y-%m-%d %H:%M:%S} UTC"] if start else []
    return _finish(path, fmt, raw, notes)


def _load_burstgpt(path: Path, names: list[str], f: io.TextIOBase) -> Workload:
    raw: list[tuple[float, int, int, tuple[int, ...]]] = []
    failed = 0
    for line, row in _rows(path, names, f):
        try:
            t = float(row["timestamp"])
        except ValueError:
            raise TraceFormatError(f"{path}:{line}: column 'Timestamp': not a number: {row['timestamp']!r}") from None
        out = _int(path, line, "Response tokens", row["response tokens"])
        if out == 0:
            failed += 1  # BurstGPT logs failed requests with no response
            continue
        raw.append((t, _int(path, line, "Request tokens", row["request tokens"]), out, ()))
    notes = [f"skipped {failed} failed request(s) (0 response tokens)"] if failed else []
    return _finish(path, "burstgpt", raw, notes)


def _load_mooncake(path: Path, first: str, f: io.TextIOBase) -> Workload:
    raw: list[tuple[float, int, int, tuple[int, ...]]] = []

    def parse(line_no: int, text: str) -> None:
        try:
            obj = json.loads(text)
            raw.append((float(obj["timestamp"]) / 1000.0, int(obj["input_length"]), int(obj["output_length"]),
                        tuple(int(h) for h in obj.get("hash_ids", ()))))
        except json.JSONDecodeError as e:
            raise TraceFormatError(f"{path}:{line_no}: not JSON: {e}") from None
        except KeyError as e:
            raise TraceFormatError(f"{path}:{line_no}: missing key {e} (Mooncake lines have timestamp, "
                                   f"input_length, output_length, hash_ids)") from None
        except (TypeError, ValueError) as e:
            raise TraceFormatError(f"{path}:{line_no}: bad value: {e}") from None

    parse(1, first)
    for i, text in enumerate(f, start=2):
        if text.strip():
            parse(i, text)
    notes = [f"shared prefixes: Mooncake hash ids of {MOONCAKE_BLOCK_TOKENS} tokens"]
    return _finish(path, "mooncake", raw, notes, block_tokens=MOONCAKE_BLOCK_TOKENS)
