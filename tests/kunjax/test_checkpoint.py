"""Checkpoints: kunjax's orbax format round-trips bit-identically onto any layout; HF safetensors dirs load
the same whether single-file or index-sharded; every broken file fails with a message that names it; the
tokenizer wrapper round-trips text and knows its special tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from kunjax.checkpoint import (
    CheckpointError,
    detect_format,
    load_config,
    load_params,
    load_tokenizer,
    save_checkpoint,
)
from kunjax.checkpoint.safetensors_io import SafetensorsFile, save_safetensors
from kunjax.config import ConfigError, ModelConfig
from kunjax.memory import param_shapes
from kunjax.tokenizer import Tokenizer
from sharding.layouts import instance_meshes, make_mesh, param_shardings

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=8, qkv_bias=True, bos_token_id=0, eos_token_ids=(1,))


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


def _random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), param_shapes(cfg),
                        is_leaf=_is_shape)


def _one_device(cfg: ModelConfig) -> dict:
    return param_shardings(instance_meshes(jax.devices()[:1], 1, 1)[0], param_shapes(cfg))


def _tp2(cfg: ModelConfig) -> dict:
    return param_shardings(instance_meshes(jax.devices()[:2], 1, 2)[0], param_shapes(cfg))


def _assert_trees_equal(actual: dict, expected: dict) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree.leaves_with_path(actual), jax.tree.leaves(expected), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)


def _assert_placed(params: dict, shardings: dict) -> None:
    for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
        assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)


# --- kunjax native format --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("native") / "ckpt"
    # Saved from a tp-sharded tree: orbax gathers the shards; the restores below go to other layouts.
    params = jax.device_put(_random_params(CFG), _tp2(CFG))
    save_checkpoint(path, CFG, params)
    return path


def test_native_round_trip_is_bit_identical(native_dir: Path):
    assert detect_format(native_dir) == "kunjax"
    assert load_config(native_dir) == CFG
    shardings = _one_device(CFG)
    params = load_params(native_dir, CFG, shardings, jnp.float32)
    _assert_trees_equal(params, _random_params(CFG))
    _assert_placed(params, shardings)


def test_native_restores_onto_tp_mesh_and_casts(native_dir: Path):
    shardings = _tp2(CFG)
    params = load_params(native_dir, CFG, shardings, "float32")
    _assert_trees_equal(params, _random_params(CFG))
    _assert_placed(params, shardings)
    wq = params["layers"]["wq"]  # [L, E, H*D] column-parallel: each device holds half the heads
    assert [s.data.shape for s in wq.addressable_shards] == [(4, 32, 16)] * 2

    bf16 = load_params(native_dir, CFG, shardings, jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16))
    _assert_trees_equal(bf16, jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), _random_params(CFG)))


def test_native_checkpoint_carries_its_tokenizer(tmp_path: Path):
    tok_dir = _bpe_tokenizer_dir(tmp_path / "tok")
    save_checkpoint(tmp_path / "ckpt", CFG, _random_params(CFG), tokenizer_file=tok_dir / "tokenizer.json")
    tok = load_tokenizer(tmp_path / "ckpt")
    assert tok is not None and tok.decode(tok.encode("the lazy fox")) == "the lazy fox"
    assert tok.bos_token_id == 0 and tok.eos_token_ids == (1,)
    assert load_tokenizer(tmp_path / "tok_absent_dir") is None
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: cannot load tokenizer"):
        load_tokenizer(tmp_path / "ckpt")


def test_native_errors_name_the_problem(native_dir: Path, tmp_path: Path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_config(tmp_path / "nope")
    bigger = ModelConfig(**(CFG.to_dict() | {"num_layers": 6, "eos_token_ids": (1,)}))
    with pytest.raises(CheckpointError, match=r"'layers/attn_norm' has shape \[4, 32\], expected \[6, 32\]"):
        load_params(native_dir, bigger, _one_device(bigger), "float32")
    with pytest.raises(CheckpointError, match=r"save_checkpoint\(.*'layers/attn_norm' has shape \[4, 32\]"):
        save_checkpoint(tmp_path / "bad", bigger, _random_params(CFG))

    broken = tmp_path / "broken"
    shutil.copytree(native_dir, broken)
    for data_dir in (broken / "params").glob("ocdbt.process_*"):
        shutil.rmtree(data_dir)
    with pytest.raises(CheckpointError, match="restore failed, files missing or corrupt"):
        load_params(broken, CFG, _one_device(CFG), "float32")
    shutil.rmtree(broken / "params")
    with pytest.raises(CheckpointError, match="params: missing"):
        load_params(broken, CFG, _one_device(CFG), "float32")
    (broken / "config.json").write_text('{"format": "kunjax", "model": {"vocab_size": 3}}')
    with pytest.raises(CheckpointError, match="bad model config"):
        load_config(broken)
    (broken / "config.json").write_text('{"format": "kunj')
    with pytest.raises(CheckpointError, match=r"config\.json: unreadable or not valid JSON"):
        load_config(broken)
    with pytest.raises(CheckpointError, match="shardings tree does not match"):
        load_params(native_dir, CFG, {"embed": _one_device(CFG)["embed"]}, "float32")


# --- safetensors reader ----------------------------------------------------------------------------


def test_safetensors_reader_agrees_with_reference_library(tmp_path: Path):
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
               "b": rng.standard_normal((7,)).astype(np.float16), "empty": np.zeros((0, 4), np.float32)}
    safetensors.numpy.save_file(tensors, tmp_path / "ref.safetensors")
    f = SafetensorsFile(tmp_path / "ref.safetensors")
    assert sorted(f) == sorted(tensors)
    for name, arr in tensors.items():
        assert f.tensor(name).dtype == arr.dtype and np.array_equal(f.tensor(name), arr)
    save_safetensors(tmp_path / "ours.safetensors", tensors)
    back = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
    assert all(np.array_equal(back[k], v) for k, v in tensors.items())
    bf = rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16)
    save_safetensors(tmp_path / "bf16.safetensors", {"w": bf})
    assert np.array_equal(SafetensorsFile(tmp_path / "bf16.safetensors").tensor("w"), bf)

    (tmp_path / "tiny.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors.*too short"):
        SafetensorsFile(tmp_path / "tiny.safetensors")
    (tmp_path / "junk.safetensors").write_bytes((4).to_bytes(8, "little") + b"{{{{")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: header is not valid JSON"):
        SafetensorsFile(tmp_path / "junk.safetensors")


# --- Hugging Face format -----------------------------------------------------------------------------

HF_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A tiny Qwen2 (q/k/v biases) saved by transformers as one file and index-sharded; its state dict."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**HF_TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p))
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "single", safe_serialization=True)
    model.save_pretrained(root / "sharded", safe_serialization=True, max_shard_size="16KB")
    return root / "single", root / "sharded", {k: v.numpy() for k, v in model.state_dict().items()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_hf_sharded_and_single_file_load_identically(hf_dirs):
    single, sharded, state = hf_dirs
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert detect_format(single) == detect_format(sharded) == "hf"
    cfg = load_config(single)
    assert load_config(sharded) == cfg and cfg.architecture == "qwen2" and cfg.qkv_bias
    a = load_params(single, cfg, _one_device(cfg), jnp.float32)
    b = load_params(sharded, cfg, _one_device(cfg), jnp.float32)
    _assert_trees_equal(a, b)
    # The mapping itself: [out, in] per layer -> [in, out] stacked over layers.
    assert np.array_equal(a["layers"]["wq"][2], state["model.layers.2.self_attn.q_proj.weight"].T)
    assert np.array_equal(a["layers"]["bk"][1], state["model.layers.1.self_attn.k_proj.bias"])
    assert np.array_equal(a["layers"]["w_down"][3], state["model.layers.3.mlp.down_proj.weight"].T)
    assert np.array_equal(a["layers"]["mlp_norm"][0], state["model.layers.0.post_attention_layernorm.weight"])
    assert np.array_equal(a["lm_head"], state["lm_head.weight"].T)
    assert np.array_equal(a["embed"], state["model.embed_tokens.weight"])


def test_hf_loads_onto_tp_mesh_slice_by_slice(hf_dirs):
    single, sharded, _ = hf_dirs
    cfg = load_config(sharded)
    shardings = _tp2(cfg)
    tp = load_params(sharded, cfg, shardings, "bfloat16")
    _assert_placed(tp, shardings)
    ref = load_params(single, cfg, _one_device(cfg), jnp.float32)
    _assert_trees_equal(tp, jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), ref))
    wo = tp["layers"]["wo"]  # [L, H*D, E] row-parallel: each device reads half the columns of o_proj
    assert isinstance(wo.sharding, NamedSharding)
    assert [s.data.shape for s in wo.addressable_shards] == [(4, 16, 32)] * 2


def test_hf_loads_layer_axis_split_over_stages(hf_dirs):
    """A pipeline layout (layers over `stage`): each device reads and holds only its own layers."""
    single, _, state = hf_dirs
    cfg = load_config(single)
    mesh = make_mesh(jax.devices()[2:4], ("stage",), (2,))
    shardings = {k: NamedSharding(mesh, P()) for k in param_shapes(cfg) if k != "layers"}
    shardings["layers"] = {k: NamedSharding(mesh, P("stage")) for k in param_shapes(cfg)["layers"]}
    params = load_params(single, cfg, shardings, jnp.float32)
    _assert_placed(params, shardings)
    for i, shard in enumerate(params["layers"]["w_up"].addressable_shards):  # [L/2, E, F] per device
        assert shard.data.shape == (2, 32, 64)
        for j in range(2):
            expect = state[f"model.layers.{shard.index[0].start + j}.mlp.up_proj.weight"].T
            assert np.array_equal(np.asarray(shard.data[j]), expect), (i, j)


def _rewrite(path: Path, edit) -> None:
    """Rewrite model.safetensors after `edit(tensors)` with the reference library's writer."""
    tensors = safetensors.numpy.load_file(path / "model.safetensors")
    edit(tensors)
    safetensors.numpy.save_file(tensors, path / "model.safetensors")


def test_hf_truncated_file(hf_dirs, tmp_path: Path):
    bad = _copy(hf_dirs[0], tmp_path / "m")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    cfg = load_config(bad)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.+' needs bytes .*\(truncated file"):
        load_params(bad, cfg, _one_device(cfg), "float32")


def test_hf_missing_tensor(hf_dirs, tmp_path: Path):
    bad = _copy(hf_dirs[0], tmp_path / "m")
    _rewrite(bad, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    cfg = load_config(bad)
    with pytest.raises(CheckpointError,
                       match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight' \(expected shape \[64, 32\]"):
        load_params(bad, cfg, _one_device(cfg), "float32")


def test_hf_wrong_shape(hf_dirs, tmp_path: Path):
    bad = _copy(hf_dirs[0], tmp_path / "m")
    _rewrite(bad, lambda t: t.update({"model.layers.2.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}))
    cfg = load_config(bad)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.self_attn\.k_proj\.weight' has shape \[32, 32\], "
                                              r"expected \[16, 32\] for layers/wk \[4, 32, 16\]"):
        load_params(bad, cfg, _one_device(cfg), "float32")


def test_hf_missing_shard_file(hf_dirs, tmp_path: Path):
    bad = _copy(hf_dirs[1], tmp_path / "m")
    weight_map = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["model.norm.weight"]
    (bad / shard).unlink()
    cfg = load_config(bad)
    with pytest.raises(CheckpointError, match=rf"tensor '.+' is in shard '{shard}', which is missing"):
        load_params(bad, cfg, _one_device(cfg), "float32")


def test_hf_tensors_the_config_does_not_explain(hf_dirs, tmp_path: Path):
    bad = _copy(hf_dirs[0], tmp_path / "m")
    _rewrite(bad, lambda t: t.update({"model.layers.4.input_layernorm.weight": np.ones(32, np.float32)}))
    cfg = load_config(bad)
    with pytest.raises(CheckpointError, match=r"does not account for: 'model\.layers\.4\.input_layernorm"):
        load_params(bad, cfg, _one_device(cfg), "float32")


def test_hf_unsupported_dtype(hf_dirs, tmp_path: Path):
    bad = _copy(hf_dirs[0], tmp_path / "m")
    _rewrite(bad, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.float64)}))
    cfg = load_config(bad)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has dtype F64; kunjax reads only BF16"):
        load_params(bad, cfg, _one_device(cfg), "float32")


def test_hf_unsupported_architecture_and_missing_weights(hf_dirs, tmp_path: Path):
    bad = _copy(hf_dirs[0], tmp_path / "m")
    hf_cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(hf_cfg | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match=r"unsupported architecture \['GPT2LMHeadModel'\]"):
        load_config(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        detect_format(bad)
    (bad / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_config(bad)


# --- tokenizer -----------------------------------------------------------------------------------------


def _bpe_tokenizer_dir(path: Path) -> Path:
    """A byte-level BPE tokenizer trained here, with BOS/EOS declared only in tokenizer_config.json."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world", "the quick brown fox jumps over the lazy dog"] * 5, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "add_bos_token": True}))
    return path


def test_bpe_tokenizer_round_trip(tmp_path: Path):
    tok = Tokenizer.from_dir(_bpe_tokenizer_dir(tmp_path))
    text = "hello wörld, the quick fox! 🦊"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 0 and ids.count(0) == 1
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.eos_token_ids == (1,)
    assert tok.is_special(0) and tok.is_special(2) and not tok.is_special(ids[1])
    assert 256 < tok.vocab_size <= 300 and all(0 <= i < tok.vocab_size for i in ids)


def test_wordlevel_tokenizer_bos_from_post_processor_and_config(tmp_path: Path):
    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, "hello": 3, "world": 4}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    tok.add_special_tokens(["[UNK]", "[BOS]", "[EOS]"])
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = ModelConfig(**(CFG.to_dict() | {"bos_token_id": 1, "eos_token_ids": (2,)}))

    plain = Tokenizer.from_dir(tmp_path, cfg)  # no tokenizer_config.json: the post-processor decides
    assert plain.encode("hello world") == [1, 3, 4]
    assert plain.decode([1, 3, 4, 2]) == "hello world"
    assert plain.bos_token_id == 1 and plain.eos_token_ids == (2,) and plain.is_special(2)
    assert plain.encode("hello there") == [1, 3, 0]

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "[BOS]"}))
    assert Tokenizer.from_dir(tmp_path, cfg).encode("hello world") == [1, 3, 4]  # never a double BOS
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert Tokenizer.from_dir(tmp_path, cfg).encode("hello world") == [3, 4]
    assert load_tokenizer(tmp_path, cfg).encode("world") == [4]
