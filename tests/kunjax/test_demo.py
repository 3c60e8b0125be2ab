"""The demo model is an oracle: it loads through `kunjax.checkpoint` and recites its passages exactly.

Recitation is checked with a naive greedy loop over `forward_dense` (full recompute each token, one padded
shape so it compiles once), independent of the engine. The first use trains the model (≈1–2 min on 2 CPU
cores); later runs read it from the cache.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kunjax.demo as demo
from kunjax.checkpoint import load_config, load_params, load_tokenizer
from kunjax.config import ModelConfig
from kunjax.memory import param_shapes
from kunjax.model import Params, forward_dense

PAD_LEN = 160  # fixed input length of the greedy loop: longer than every passage + <eos>


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return demo.ensure_demo_model()


@pytest.fixture(scope="session")
def demo_model(demo_dir: Path) -> tuple[ModelConfig, Params]:
    cfg = load_config(demo_dir)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: dev, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    return cfg, load_params(demo_dir, cfg, shardings, jnp.float32)


def greedy_recite(cfg: ModelConfig, params: Params, prompts: list[list[int]], max_len: int) -> list[list[int]]:
    """Naive greedy loop: each step recomputes the whole [B, max_len] batch; returns ids up to <eos>."""
    eos = cfg.eos_token_ids[0]

    @jax.jit
    def next_tokens(params, tokens, lens):  # tokens [B, max_len] int32, lens [B] int32 -> [B] int32
        logits = forward_dense(cfg, params, tokens)  # [B, max_len, V]
        last = jnp.take_along_axis(logits, (lens - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
        return jnp.argmax(last, axis=-1).astype(jnp.int32)

    tokens = np.zeros((len(prompts), max_len), np.int32)
    lens = np.array([len(p) for p in prompts], np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    while not done.all() and lens.max() < max_len:
        nxt = np.array(next_tokens(params, jnp.asarray(tokens), jnp.asarray(lens)))
        for i in np.flatnonzero(~done):
            out[i].append(int(nxt[i]))
            done[i] = nxt[i] == eos
            if not done[i]:
                tokens[i, lens[i]] = nxt[i]
                lens[i] += 1
    return out


def test_prompts_identify_passages():
    passages = demo.memorized_passages()
    assert 25 <= len(passages) <= 40
    assert 2000 <= sum(len(p.split()) for p in passages) <= 3000
    pairs = demo.recitation_prompts(8)
    assert [p + c for p, c in pairs] == passages
    assert len({p for p, _ in pairs}) == len(passages)
    assert len({p.split()[0] for p in passages}) == len(passages)  # even the first word is distinct


def test_cache_key_follows_the_corpus(monkeypatch):
    key = demo.demo_cache_key()
    assert key == demo.demo_cache_key()
    monkeypatch.setattr(demo, "corpus_text", lambda: "A different corpus.\n")
    assert demo.demo_cache_key() != key


def test_cached_model_is_reused(demo_dir: Path):
    logs: list[str] = []
    assert demo.ensure_demo_model(log=logs.append) == demo_dir
    assert logs == []  # no training the second time


def test_tokenizer_round_trips_corpus(demo_dir: Path):
    cfg = load_config(demo_dir)
    tok = load_tokenizer(demo_dir)
    assert tok is not None
    assert tok.bos_token_id == cfg.bos_token_id
    assert cfg.eos_token_ids[0] in tok.eos_token_ids
    assert tok.vocab_size == cfg.vocab_size
    text = demo.corpus_text()
    assert tok.decode(tok.encode(text)) == text
    for passage in demo.memorized_passages():
        ids = tok.encode(passage)
        assert ids[0] == cfg.bos_token_id and ids.count(cfg.bos_token_id) == 1
        assert tok.decode(ids) == passage
    for prompt, continuation in demo.recitation_prompts():  # a prompt's tokens prefix its passage's
        head = tok.encode(prompt)
        assert tok.encode(prompt + continuation)[: len(head)] == head


def test_layers_hold_most_parameters(demo_dir: Path):
    cfg = load_config(demo_dir)
    assert cfg.architecture == "llama" and not cfg.tie_word_embeddings
    assert cfg.num_layers % 8 == 0  # pipeline splits into 2, 4 and 8 stages
    assert cfg.num_kv_heads < cfg.num_heads  # GQA
    sizes = jax.tree.map(lambda s: int(np.prod(s)), param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    layers = sum(jax.tree.leaves(sizes["layers"]))
    assert layers / sum(jax.tree.leaves(sizes)) > 0.8


def test_recites_passages_exactly(demo_dir: Path, demo_model: tuple[ModelConfig, Params]):
    cfg, params = demo_model
    tok = load_tokenizer(demo_dir)
    assert tok is not None
    passages = demo.memorized_passages()
    pairs = demo.recitation_prompts(8)
    longest = max(range(len(passages)), key=lambda i: len(tok.encode(passages[i])))
    picked = sorted({*np.linspace(0, len(passages) - 1, 6).round().astype(int).tolist(), longest})
    prompts = [tok.encode(pairs[i][0]) for i in picked]
    expected = [tok.encode(passages[i])[len(p):] + [cfg.eos_token_ids[0]] for i, p in zip(picked, prompts,
                                                                                         strict=True)]
    assert max(len(p) + len(e) for p, e in zip(prompts, expected, strict=True)) <= PAD_LEN
    got = greedy_recite(cfg, params, prompts, PAD_LEN)
    for i, g, e in zip(picked, got, expected, strict=True):
        assert g == e, f"passage {i}: got {tok.decode(g)!r}, expected {pairs[i][1]!r}"
        assert tok.decode(g) == pairs[i][1]
