"""Specification of `IncrementalDetokenizer`.

Oracles: `tokenizer.decode(all output ids)` of a real byte-level BPE tokenizer (trained here on text with
accents, CJK and emoji, so characters split across tokens), and for stop strings a brute-force reference that
re-decodes the whole output after every token.
"""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kunjax.detokenizer import PROMPT_CONTEXT_TOKENS, IncrementalDetokenizer
from kunjax.sampling_params import SamplingParams

CORPUS = [
    "The naïve café serves crème brûlée to every guest.",
    "東京 is a big city; 東京タワー is tall. 🙂 🙂 🙂",
    "Hello world! Hello again, world.",
    "Ünïcödé text with emoji 🚀 and 日本語の文章です。",
    "def square(x):\n    return x ** 2  # code\n",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


class PieceTokenizer:
    """Id i decodes to pieces[i]; ids in `special` vanish with skip_special_tokens."""

    def __init__(self, pieces: list[str], special: frozenset[int] = frozenset()) -> None:
        self.pieces, self.special = pieces, special

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i in self.special))

    def ids(self, *pieces: str) -> list[int]:
        return [self.pieces.index(p) for p in pieces]


class ByteTokenizer:
    """Ids 0..255 are raw UTF-8 bytes, decoded lossily like a byte-level BPE; 256 is a special token."""

    EOS = 256

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i == self.EOS:
                if not skip_special_tokens:
                    out.append(buf.decode("utf-8", "replace") + "<eos>")
                    buf = bytearray()
            else:
                buf.append(i)
        return "".join(out) + buf.decode("utf-8", "replace")


def stream(detok: IncrementalDetokenizer, ids: list[int], finish: bool = True) -> tuple[list[str], bool]:
    deltas, hit = [], False
    for i in ids:
        delta, hit = detok.add(i)
        deltas.append(delta)
        assert detok.text == "".join(deltas)
        if hit:
            break
    if finish and not hit:
        deltas.append(detok.finish())
    return deltas, hit


# ---------------------------------------------------------------------------------------------------------------
# Plain detokenization


def test_round_trip_of_encoded_text(bpe):
    text = " ".join(CORPUS)
    ids = bpe.encode(text).ids
    detok = IncrementalDetokenizer(bpe, prompt_ids=bpe.encode("Prompt: ").ids)
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == text == detok.text
    assert detok.output_ids == ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_match_full_decode(bpe, skip_special_tokens):
    """Random ids split multi-byte characters anywhere (and form invalid UTF-8); the stream still adds up."""
    rng = np.random.default_rng(0)
    vocab = bpe.get_vocab_size()
    for _ in range(8):
        ids = [int(i) for i in rng.integers(0, vocab, size=300)]
        prompt = [int(i) for i in bpe.encode("東京 café").ids]
        detok = IncrementalDetokenizer(bpe, prompt, skip_special_tokens=skip_special_tokens)
        deltas, hit = stream(detok, ids)
        assert not hit
        assert "".join(deltas) == bpe.decode(ids, skip_special_tokens=skip_special_tokens)


def test_split_character_is_withheld_until_complete():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, prompt_ids=list(b"hi "))
    deltas = [detok.add(b)[0] for b in "a東🙂".encode()]
    assert deltas == ["a", "", "", "東", "", "", "", "🙂"]


def test_finish_flushes_an_incomplete_character_as_decode_would():
    tok = ByteTokenizer()
    ids = list("x東".encode())[:-1]  # the last byte of 東 never arrives
    detok = IncrementalDetokenizer(tok, prompt_ids=[])
    deltas, _ = stream(detok, ids)
    assert deltas[:-1] == ["x", "", ""] and "".join(deltas) == tok.decode(ids) == "x\ufffd"
    assert detok.finish() == ""  # idempotent
    with pytest.raises(RuntimeError):
        detok.add(65)


def test_skipped_special_tokens_produce_no_text():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, prompt_ids=[], skip_special_tokens=True)
    assert [detok.add(i)[0] for i in [*b"ok", tok.EOS]] == ["o", "k", ""]
    detok = IncrementalDetokenizer(tok, prompt_ids=[], skip_special_tokens=False)
    assert [detok.add(i)[0] for i in [*b"ok", tok.EOS]] == ["o", "k", "<eos>"]


def test_decode_cost_is_bounded_by_a_window(bpe):
    calls: list[int] = []

    class Counting:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            calls.append(len(ids))
            return bpe.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = bpe.encode(" ".join(CORPUS * 10)).ids
    detok = IncrementalDetokenizer(Counting(), prompt_ids=bpe.encode("a long prompt " * 20).ids)
    stream(detok, ids)
    assert len(ids) > 300
    assert max(calls) <= PROMPT_CONTEXT_TOKENS + 8  # a few tokens, not the output length
    assert len(calls) <= 2 * len(ids) + 2


# ---------------------------------------------------------------------------------------------------------------
# Stop strings

PIECES = PieceTokenizer(["Hel", "lo", " wo", "rld", "!", "###", "a<", "en", "d>", "x", "ab##cd", "<end>", "q"])


def test_stop_string_spanning_a_token_boundary():
    detok = IncrementalDetokenizer(PIECES, [], stop=("o wo",))
    deltas, hit = stream(detok, PIECES.ids("Hel", "lo", " wo", "rld"))
    assert hit and detok.stop_reason == "o wo" and detok.finished
    assert deltas == ["Hel", "l", ""]  # the "o" was held back: it was the start of the stop string
    assert detok.text == "Hell"
    assert detok.output_ids == PIECES.ids("Hel", "lo", " wo")


def test_stop_string_kept_when_requested():
    detok = IncrementalDetokenizer(PIECES, [], stop=("o wo",), include_stop_str_in_output=True)
    deltas, hit = stream(detok, PIECES.ids("Hel", "lo", " wo", "rld"))
    assert hit and deltas == ["Hel", "lo", " wo"] and detok.text == "Hello wo"


def test_text_after_the_stop_string_in_the_same_token_is_cut():
    detok = IncrementalDetokenizer(PIECES, [], stop=("##",))
    assert detok.add(PIECES.ids("ab##cd")[0]) == ("ab", True)
    assert detok.text == "ab"
    detok = IncrementalDetokenizer(PIECES, [], stop=("##",), include_stop_str_in_output=True)
    assert detok.add(PIECES.ids("ab##cd")[0]) == ("ab##", True)


def test_stop_string_at_the_very_first_token():
    detok = IncrementalDetokenizer(PIECES, [1, 2, 3], stop=("###",))
    assert detok.add(PIECES.ids("###")[0]) == ("", True)
    assert detok.text == "" and detok.finish() == ""
    detok = IncrementalDetokenizer(PIECES, [], stop=("###",), include_stop_str_in_output=True)
    assert detok.add(PIECES.ids("###")[0]) == ("###", True)


def test_held_back_partial_match_is_emitted_when_it_is_not_a_stop():
    detok = IncrementalDetokenizer(PIECES, [], stop=("<end>",))
    deltas, hit = stream(detok, PIECES.ids("a<", "en", "x"), finish=False)
    assert not hit and deltas == ["a", "", "<enx"]


def test_held_back_partial_match_is_flushed_at_finish():
    detok = IncrementalDetokenizer(PIECES, [], stop=("<end>",))
    deltas, hit = stream(detok, PIECES.ids("a<", "en"))
    assert not hit and deltas == ["a", "", "<en"] and detok.text == "a<en"


def test_stop_string_assembled_from_three_tokens():
    detok = IncrementalDetokenizer(PIECES, [], stop=("<end>",))
    deltas, hit = stream(detok, PIECES.ids("a<", "en", "d>", "x"))
    assert hit and deltas == ["a", "", ""] and detok.text == "a"


def test_earliest_stop_string_wins():
    detok = IncrementalDetokenizer(PIECES, [], stop=("rld", "lo wo"))
    _, hit = stream(detok, PIECES.ids("Hel", "lo", " wo", "rld"))
    assert hit and detok.stop_reason == "lo wo" and detok.text == "Hel"


def test_stop_string_split_inside_a_character():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], stop=("京",))
    deltas, hit = stream(detok, list("東京タワー".encode()))
    assert hit and "".join(deltas) == "東" == detok.text


def test_stop_strings_wait_for_min_tokens():
    detok = IncrementalDetokenizer(PIECES, [], stop=("###",), min_tokens=1)
    stop, x = PIECES.ids("###", "x")
    assert detok.add(stop) == ("#", False)  # ignored as a stop, but "##" could still start one
    assert detok.add(x) == ("##x", False)
    assert detok.add(stop) == ("", True)
    assert detok.text == "###x"


def test_built_from_sampling_params():
    params = SamplingParams(stop=["o wo"], include_stop_str_in_output=True)
    detok = IncrementalDetokenizer.from_params(PIECES, [], params)
    _, hit = stream(detok, PIECES.ids("Hel", "lo", " wo"))
    assert hit and detok.text == "Hello wo"


def reference_stop(tok: PieceTokenizer, ids: list[int], stops: tuple[str, ...],
                   include: bool) -> tuple[str, bool]:
    """Re-decode everything after each token; stop at the first token that completes a stop string."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n])
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            start, s = min(hits, key=lambda h: (h[0], len(h[1])))
            return text[:start + len(s)] if include else text[:start], True
    return tok.decode(ids), False


@pytest.mark.parametrize("include", [False, True])
def test_random_streams_match_reference_and_never_stream_cut_text(include):
    tok = PieceTokenizer(["a", "b", "c", "ab", "ba", "bca", "cc", "abc"])
    stops = ("abca", "cb", "bab")
    rng = np.random.default_rng(1)
    num_hits = 0
    for _ in range(300):
        ids = [int(i) for i in rng.integers(0, len(tok.pieces), size=int(rng.integers(1, 12)))]
        expected, expected_hit = reference_stop(tok, ids, stops, include)
        detok = IncrementalDetokenizer(tok, [], stop=stops, include_stop_str_in_output=include)
        deltas, hit = stream(detok, ids)
        assert hit == expected_hit and detok.text == expected, (ids, deltas)
        streamed = ""
        for d in deltas:  # every prefix of the stream is a prefix of the final text: nothing is taken back
            streamed += d
            assert expected.startswith(streamed)
        num_hits += hit
    assert 50 < num_hits < 290  # both outcomes are exercised
