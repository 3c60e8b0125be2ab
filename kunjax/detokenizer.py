"""Incremental detokenization of one request's output, with stop strings.

`IncrementalDetokenizer` owns turning generated ids into streamed text. It decodes only a short window of
recent ids per token (the prefix/read-offset technique), so a token costs O(window), not O(output length), and
it withholds text while the window ends in U+FFFD — an incomplete UTF-8 sequence whose remaining bytes are in
tokens not generated yet.

Stop strings are searched in the decoded text, across token boundaries. Unless the stop string is to be kept
in the output, text that could still become the start of a stop string is held back until the next tokens
decide it, so a client never receives text that is later cut.

Invariant: `text` is always exactly the concatenation of the deltas returned by `add` and `finish`. When no
stop string hits, after `finish()` it equals `tokenizer.decode(output_ids)` for byte-level tokenizers (for
SentencePiece-style tokenizers the prompt tail in the window keeps the first token's leading space, as vLLM
does). This module never decides that a request ends on EOS, stop token ids or length — the engine does, and
then calls `finish()` to flush what was held back.
"""

from __future__ import annotations

from typing import Protocol

from kunjax.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
# Prompt ids decoded in front of the first output token: enough context for tokenizers whose decode of a token
# depends on its left neighbour (SentencePiece leading spaces, byte fallback).
PROMPT_CONTEXT_TOKENS = 5


class TextDecoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Streams one request's output text, token by token.

    `add(token_id)` returns `(delta, stop_hit)`: the text that is new and safe to send, and whether a stop
    string completed (the request must then finish with that stop string as its reason, see `stop_reason`).
    """

    def __init__(
        self,
        tokenizer: TextDecoder,
        prompt_ids: list[int],
        skip_special_tokens: bool = True,
        stop: tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        # As in vLLM, stop strings count only once the output is longer than min_tokens.
        self._min_tokens = min_tokens
        self._max_stop_len = max((len(s) for s in self._stop), default=0)

        # Window bookkeeping, as indices into `_ids` (the prompt tail, then every output id):
        # `_ids[_prefix_offset:_read_offset]` decodes to text already appended to `_decoded`;
        # `_ids[_read_offset:]` is pending (its text ended in an incomplete character last time).
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._num_context = len(context)
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context)

        self._decoded = ""  # all text decoded from the output so far (before stop truncation / hold-back)
        self._text = ""  # what has been returned as deltas; always a prefix of the final output text
        self.stop_reason: str | None = None  # the stop string that hit
        self.finished = False

    @classmethod
    def from_params(cls, tokenizer: TextDecoder, prompt_ids: list[int],
                    params: SamplingParams) -> IncrementalDetokenizer:
        return cls(tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
                   stop=tuple(params.stop or ()),
                   include_stop_str_in_output=params.include_stop_str_in_output,
                   min_tokens=params.min_tokens)

    @property
    def text(self) -> str:
        """The output text streamed so far (truncated at the stop string once one hit)."""
        return self._text

    @property
    def output_ids(self) -> list[int]:
        """Every output id added, including the one that completed a stop string (a copy)."""
        return self._ids[self._num_context:]

    @property
    def num_output_tokens(self) -> int:
        return len(self._ids) - self._num_context

    def add(self, token_id: int) -> tuple[str, bool]:
        """Appends one generated id; returns (new text to stream, whether a stop string completed)."""
        if self.finished:
            raise RuntimeError("IncrementalDetokenizer.add after the output finished")
        self._ids.append(int(token_id))
        old_len = len(self._decoded)
        self._decoded += self._decode_step(final=False)

        if self._stop and self.num_output_tokens > self._min_tokens and len(self._decoded) > old_len:
            hit = self._find_stop(old_len)
            if hit is not None:
                start, stop = hit
                end = start + len(stop) if self._include_stop else start
                self.stop_reason = stop
                self.finished = True
                return self._emit(end), True
        return self._emit(len(self._decoded) - self._held_back()), False

    def finish(self) -> str:
        """Ends the output for a reason other than a stop string; returns the text that was held back.

        Flushes the held-back possible start of a stop string and any incomplete trailing character (decoded
        as U+FFFD, as `tokenizer.decode` would). Idempotent; returns "" after a stop string hit.
        """
        if self.finished:
            return ""
        self.finished = True
        self._decoded += self._decode_step(final=True)
        return self._emit(len(self._decoded))

    # -- internals -------------------------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_step(self, final: bool) -> str:
        """New text from the pending ids, advancing the window when the text is complete (or `final`)."""
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset:])
        if not final and (len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            # Nothing visible yet (e.g. a skipped special token), or the last character is incomplete.
            return ""
        delta = new_text[len(self._prefix_text):]
        # The new prefix window is what was pending; its text is what just got appended.
        self._prefix_text = self._decode(self._ids[self._read_offset:])
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta

    def _find_stop(self, old_len: int) -> tuple[int, str] | None:
        """The earliest stop string occurrence that ends in the text added since `old_len`."""
        best: tuple[int, str] | None = None
        for s in self._stop:
            # An occurrence ending past old_len starts no earlier than old_len - len(s) + 1.
            i = self._decoded.find(s, max(0, old_len - len(s) + 1))
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) < len(best[1]))):
                best = (i, s)
        return best

    def _held_back(self) -> int:
        """Length of the longest suffix of the decoded text that is a proper prefix of some stop string."""
        if self._include_stop or not self._stop:
            return 0  # a stop string that completes later is kept in the output, so nothing gets cut
        text = self._decoded
        for n in range(min(self._max_stop_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _emit(self, end: int) -> str:
        """Streams `_decoded[len(text):end]` (never moves backwards)."""
        start = len(self._text)
        if end <= start:
            return ""
        delta = self._decoded[start:end]
        self._text += delta
        return delta
