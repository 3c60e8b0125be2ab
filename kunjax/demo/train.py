"""Training of the built-in demo model: a byte-level BPE tokenizer and a small Llama that recites `corpus.txt`.

This module owns the demo's recipe — the tokenizer, the model shape (`demo_model_config`), the optimiser and the
stopping rule — and writes the result with `kunjax.checkpoint.save_checkpoint`. It never decides where the
model is cached (that is `kunjax.demo.ensure_demo_model`) and never defines a checkpoint format of its own.

The model is sized like a real LLM in proportion (DESIGN.md §6, "Embeddings and the LM head"): eight layers
hold almost 90% of the parameters, the vocabulary is the tokenizer's own ~1k tokens, so dropping layers in a
pipeline group frees most of the weight memory.

Stopping rule: training runs until every passage is *recited*, checked teacher-forced — at every position
after the passage's first `prompt_words` words (through `<eos>`), the true next token is the argmax of the
logits by at least `logit_margin`. Since greedy decoding from the prompt feeds back exactly those tokens, this
implies exact greedy recitation, and the margin keeps it exact under the small numeric differences of other
forwards (paged attention, pipeline stages, bf16 weights, another device). Everything is seeded: runs with
the same device setup are bit-identical; another setup (e.g. 8 simulated CPU devices, which splits the CPU
thread pool) may differ in the last bits and still satisfies the same stopping rule.

Run directly: `python -m kunjax.demo.train --out DIR` (see `--help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from kunjax.config import ModelConfig
from kunjax.memory import param_shapes
from kunjax.model import Params, forward_dense, init_params

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2


def _knob(default: int | float, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class DemoTrainConfig:
    """Every knob of the demo recipe; all of it (with the corpus) keys the cache. Each is a CLI flag."""

    vocab_size: int = _knob(1024, "BPE vocabulary size, special tokens included")
    hidden_size: int = _knob(128, "E: model width")
    intermediate_size: int = _knob(512, "F: SwiGLU width")
    num_layers: int = _knob(8, "L: decoder layers (divisible by 2, 4 and 8 for pipeline splits)")
    num_heads: int = _knob(4, "H: query heads")
    num_kv_heads: int = _knob(2, "K: key/value heads (GQA)")
    head_dim: int = _knob(32, "D: head dimension")
    max_position_embeddings: int = _knob(512, "longest sequence the model is configured for")
    seed: int = _knob(0, "seed of the initial weights and of the batch order")
    batch_size: int = _knob(12, "passages per optimiser step")
    learning_rate: float = _knob(3e-3, "peak AdamW learning rate")
    warmup_steps: int = _knob(10, "linear warmup steps from 0 to the peak")
    decay_steps: int = _knob(70, "cosine decay steps after warmup, down to final_lr_fraction of the peak")
    final_lr_fraction: float = _knob(0.02, "learning rate after the decay, as a fraction of the peak")
    weight_decay: float = _knob(0.0, "AdamW weight decay")
    grad_clip: float = _knob(1.0, "global gradient-norm clip")
    max_steps: int = _knob(300, "give up (error) if not recited by then")
    check_every: int = _knob(5, "steps between recitation checks")
    prompt_words: int = _knob(8, "recitation is checked after this many words of each passage")
    logit_margin: float = _knob(2.0, "stop once the true token beats every other by this much everywhere")


def train_tokenizer(passages: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE on the passages; encoding prepends `<bos>`, decoding restores the exact text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(passages, trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos)])
    return tok


def demo_model_config(tcfg: DemoTrainConfig, tok: Tokenizer) -> ModelConfig:
    return ModelConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=tcfg.hidden_size,
        intermediate_size=tcfg.intermediate_size,
        num_layers=tcfg.num_layers,
        num_heads=tcfg.num_heads,
        num_kv_heads=tcfg.num_kv_heads,
        head_dim=tcfg.head_dim,
        max_position_embeddings=tcfg.max_position_embeddings,
        architecture="llama",
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_ids=(tok.token_to_id(EOS),),
    )


def prompt_token_count(tok: Tokenizer, passage: str, n_words: int) -> int:
    """Tokens (with `<bos>`) of the passage's first `n_words` words — a prefix of the passage's tokens."""
    prompt = " ".join(passage.split(" ")[:n_words])
    ids = tok.encode(prompt).ids
    full = tok.encode(passage).ids
    if full[: len(ids)] != ids:
        raise ValueError(f"prompt tokens are not a prefix of the passage tokens: {prompt!r}")
    return len(ids)


@dataclasses.dataclass(frozen=True)
class DemoBatch:
    """All passages as one padded array; rows are `<bos> passage <eos> <pad>...`."""

    tokens: np.ndarray  # [N, T + 1] int32
    loss_mask: np.ndarray  # [N, T] float32: 1 where target tokens[:, 1:] is real
    check_mask: np.ndarray  # [N, T] float32: 1 where the target must be recited (after the prompt)


def build_batch(tok: Tokenizer, passages: list[str], prompt_words: int) -> DemoBatch:
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    seqs = [tok.encode(p).ids + [eos] for p in passages]
    t = int(math.ceil((max(map(len, seqs)) - 1) / 8) * 8)  # input length, a multiple of 8
    tokens = np.full((len(seqs), t + 1), pad, np.int32)
    loss_mask = np.zeros((len(seqs), t), np.float32)
    check_mask = np.zeros((len(seqs), t), np.float32)
    for i, (s, p) in enumerate(zip(seqs, passages, strict=True)):
        tokens[i, : len(s)] = s
        loss_mask[i, : len(s) - 1] = 1.0
        # Input position j predicts token j + 1; the prompt holds tokens [0, n), so check targets n..len-1.
        n = prompt_token_count(tok, p, prompt_words)
        check_mask[i, n - 1 : len(s) - 1] = 1.0
    return DemoBatch(tokens, loss_mask, check_mask)


def _loss(cfg: ModelConfig, params: Params, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over real targets; tokens [B, T + 1] int32, mask [B, T] float32."""
    logits = forward_dense(cfg, params, tokens[:, :-1])  # [B, T, V]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])  # [B, T]
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _margins(cfg: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """Teacher-forced margin of the true next token over the best other token: [B, T] float32."""
    logits = forward_dense(cfg, params, tokens[:, :-1])  # [B, T, V]
    target = tokens[:, 1:]
    true = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    others = jnp.where(jax.nn.one_hot(target, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return true - jnp.max(others, axis=-1)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    params: Params
    steps: int
    seconds: float
    loss: float
    min_margin: float
    recited: bool


def train_params(cfg: ModelConfig, tcfg: DemoTrainConfig, batch: DemoBatch,
                 log: Callable[[str], None] = print,
                 on_step: Callable[[dict[str, str]], None] | None = None) -> TrainResult:
    """AdamW (linear warmup, cosine decay) until every passage is recited with the margin, or max_steps.

    Each recitation check is logged; with `on_step` (a progress bar), that is called after every step instead,
    with the last check's loss and share of exactly recited tokens."""
    t0 = time.perf_counter()
    params = init_params(cfg, seed=tcfg.seed, dtype=jnp.float32)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tcfg.learning_rate, tcfg.warmup_steps, tcfg.warmup_steps + tcfg.decay_steps,
        end_value=tcfg.learning_rate * tcfg.final_lr_fraction)
    opt = optax.chain(optax.clip_by_global_norm(tcfg.grad_clip),
                      optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=tcfg.weight_decay))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, tokens, mask):  # tokens [B, T + 1], mask [B, T]
        loss, grads = jax.value_and_grad(lambda p: _loss(cfg, p, tokens, mask))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    margins = jax.jit(lambda p, tokens: _margins(cfg, p, tokens))
    all_tokens = jnp.asarray(batch.tokens)
    check = batch.check_mask > 0
    n = batch.tokens.shape[0]
    bs = min(tcfg.batch_size, n)
    rng = np.random.default_rng(tcfg.seed)
    order: list[int] = []
    loss, min_margin, recited, steps = float("nan"), float("-inf"), False, 0
    fields: dict[str, str] = {}
    while steps < tcfg.max_steps:
        if len(order) < bs:  # reshuffle per epoch; a batch never straddles two epochs' leftovers
            order = [int(i) for i in rng.permutation(n)]
        idx, order = order[:bs], order[bs:]
        params, opt_state, loss_arr = step(params, opt_state, batch.tokens[idx], batch.loss_mask[idx])
        steps += 1
        if steps % tcfg.check_every == 0 or steps == tcfg.max_steps:
            loss = float(loss_arr)
            m = np.asarray(margins(params, all_tokens))
            min_margin = float(m[check].min())
            exact = float((m[check] > 0).mean())
            recited = min_margin >= tcfg.logit_margin
            fields = {"loss": f"{loss:.4f}", "recited": f"{exact:.1%}"}
            if on_step is None:
                log(f"demo: step {steps:4d}  loss {loss:.4f}  exact {exact:7.2%}  min margin {min_margin:+.2f}  "
                    f"{time.perf_counter() - t0:6.1f}s")
        if on_step is not None:
            loss_arr.block_until_ready()  # the bar counts finished steps, not dispatched ones
            on_step(fields)
        if recited:
            break
    return TrainResult(params, steps, time.perf_counter() - t0, loss, min_margin, recited)


def train_demo(out: str | Path, passages: list[str], tcfg: DemoTrainConfig = DemoTrainConfig(),
               log: Callable[[str], None] = print,
               on_step: Callable[[dict[str, str]], None] | None = None) -> TrainResult:
    """Train tokenizer and model on `passages` and save a kunjax checkpoint at `out` (`on_step`: see
    `train_params`)."""
    from kunjax.checkpoint import save_checkpoint

    tok = train_tokenizer(passages, tcfg.vocab_size)
    cfg = demo_model_config(tcfg, tok)
    batch = build_batch(tok, passages, tcfg.prompt_words)
    n_params = sum(math.prod(s) for s in jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)))
    log(f"demo: training {cfg.num_layers}-layer model ({n_params / 1e6:.2f}M params, vocab {cfg.vocab_size}) "
        f"on {len(passages)} passages, {int(batch.loss_mask.sum())} tokens")
    result = train_params(cfg, tcfg, batch, log, on_step)
    if not result.recited:
        raise RuntimeError(f"demo model did not learn to recite its corpus in {result.steps} steps "
                           f"(min margin {result.min_margin:+.2f} < {tcfg.logit_margin}); raise max_steps")
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = Path(tmp) / "tokenizer.json"
        tok.save(str(tok_file))
        # Names the special tokens for `kunjax.tokenizer` and HF tools; BOS comes from the post-processor.
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "add_eos_token": False}, indent=2) + "\n")
        save_checkpoint(out, cfg, jax.device_get(result.params), tokenizer_file=tok_file)
    log(f"demo: recited every passage after {result.steps} steps in {result.seconds:.1f}s")
    return result


def main(argv: list[str] | None = None) -> None:
    from kunjax.demo import memorized_passages

    defaults = DemoTrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m kunjax.demo.train",
        description="Train the built-in demo model (tokenizer + small Llama) until it recites every passage "
                    "of kunjax/demo/corpus.txt exactly, and save it as a kunjax checkpoint. "
                    "`kunjax.demo.ensure_demo_model()` does the same into a cache directory.")
    parser.add_argument("--out", required=True, help="directory to write the checkpoint to")
    for f in dataclasses.fields(DemoTrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name),
                            help=f"{f.metadata['help']} (default: %(default)s)")
    args = parser.parse_args(argv)
    tcfg = DemoTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoTrainConfig)})
    try:
        train_demo(args.out, memorized_passages(), tcfg)
    except RuntimeError as e:
        parser.exit(1, f"error: {e}\n")
    print(json.dumps(dataclasses.asdict(tcfg)))


if __name__ == "__main__":
    main()
