"""Output-token throughput of kunjax vs Hugging Face `transformers` `generate`, same model, same prompts, one run.

    python benchmarks/throughput_vs_transformers.py                 # one instance stepping 64 sequences
    python benchmarks/throughput_vs_transformers.py --instances 8 --max-num-seqs 8   # the demo's 8 CPU devices
    python benchmarks/throughput_vs_transformers.py --async-scheduling both   # serial and overlapped loops too

A random Llama checkpoint is written with `transformers` (`save_pretrained`, safetensors) and loaded by both
sides. Both generate greedily, exactly `--max-tokens` new tokens for each of the `--prompts` prompts (EOS is
ignored on both sides so they do the same work); transformers runs the prompts as one left-padded batch with
its KV cache. Warm-up (kunjax's ahead-of-time compile, one small transformers call) is excluded on both sides.
The ratio is printed last; this machine is shared, so compare ratios, not absolute figures. `--async-scheduling
on` runs kunjax with the overlapped step loop (kunjax/overlap.py); `both` runs it serially, then overlapped (two
engines, one after the other, in this process), and prints overlapped / serial too.

On a CPU the default is one instance: every simulated device is a replica with its own copy of the weights, and
each one's step reads the whole LM head (here 32 MB) for its few rows, with the devices' computations contending
for the same cores; several instances are for the elastic demo, not for speed (`docs/performance.md` says what
they cost).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64, help="number of prompts (default 64)")
    ap.add_argument("--min-prompt-len", type=int, default=16)
    ap.add_argument("--max-prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--instances", type=int, default=1, help="kunjax instances (CPU: simulated devices)")
    ap.add_argument("--max-num-seqs", type=int, default=64, help="kunjax sequences per instance step")
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--async-scheduling", choices=("off", "on", "both"), default="off",
                    help="kunjax's step loop: serial, overlapped, or both one after the other")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))  # this checkout's kunjax, not whichever one the interpreter has installed
    import jax

    jax.config.update("jax_num_cpu_devices", max(args.instances, 1))
    import numpy as np
    import torch
    import transformers

    from kunjax import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, args.vocab) for _ in range(rng.randint(args.min_prompt_len, args.max_prompt_len))]
               for _ in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        hf_cfg = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=max(
                args.hidden // 128, 1), max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(hf_cfg).eval()
        model.save_pretrained(tmp, safe_serialization=True)
        n_params = sum(p.numel() for p in model.parameters())

        # ---- kunjax ------------------------------------------------------------------------------------
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        loops = {"off": (False,), "on": (True,), "both": (False, True)}[args.async_scheduling]
        runs = {}
        for overlap in loops:
            llm = LLM(tmp, num_instances=args.instances, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=256,
                      kv_cache_bytes=256 * 2**20, async_scheduling=overlap)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            runs[overlap] = (time.perf_counter() - t0, outs, load)
        kj_s, outs, _ = runs[loops[-1]]
        kj_tokens = sum(len(o.token_ids) for o in outs)

        # ---- transformers ------------------------------------------------------------------------------
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as decoder-only generation requires
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        gen_kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.inference_mode():
            model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=2, min_new_tokens=2, **gen_kwargs)
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=args.max_tokens,
                                 min_new_tokens=args.max_tokens, **gen_kwargs)
            hf_s = time.perf_counter() - t0
        hf_tokens = out[:, width:].numel()
        agree = float(np.mean([o.token_ids == out[i, width:].tolist() for i, o in enumerate(outs)]))

    figures = {
        "model": f"random Llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
                 f"{n_params / 1e6:.1f}M params, fp32",
        "prompts": args.prompts, "max_tokens": args.max_tokens, "platform": jax.devices()[0].platform,
        "kunjax_instances": args.instances, "kunjax_max_num_seqs": args.max_num_seqs,
        "kunjax_attention_backend": llm.engine.executor.backend, "torch_threads": args.threads,
        "kunjax_tok_s": kj_tokens / kj_s, "transformers_tok_s": hf_tokens / hf_s,
        "kunjax_s": kj_s, "transformers_s": hf_s, "greedy_outputs_identical_fraction": agree,
    }
    figures["ratio_kunjax_over_transformers"] = figures["kunjax_tok_s"] / figures["transformers_tok_s"]
    figures["async_scheduling"] = args.async_scheduling
    for overlap, (s, o, load) in runs.items():
        name = "overlapped" if overlap else "serial"
        figures[f"kunjax_{name}_tok_s"] = sum(len(x.token_ids) for x in o) / s
        figures[f"kunjax_{name}_load_average"] = load
    if len(runs) == 2:
        figures["overlapped_outputs_equal_serial"] = [x.token_ids for x in runs[True][1]] == [
            x.token_ids for x in runs[False][1]]
        figures["ratio_overlapped_over_serial"] = figures["kunjax_overlapped_tok_s"] / figures["kunjax_serial_tok_s"]
    print(f"model: {figures['model']}; {args.prompts} prompts x {args.max_tokens} new tokens; "
          f"{jax.devices()[0].platform}, {args.instances} kunjax instance(s) x {args.max_num_seqs} sequences, "
          f"attention {figures['kunjax_attention_backend']}, torch threads {args.threads}")
    for overlap, (s, o, load) in runs.items():
        n = sum(len(x.token_ids) for x in o)
        print(f"kunjax {'overlapped' if overlap else 'serial    '}  {n:6d} tokens in {s:7.2f}s = {n / s:8.1f} tok/s "
              f"(load average {load:.2f} at its start)")
    if len(runs) == 2:
        print(f"overlapped / serial: {figures['ratio_overlapped_over_serial']:.2f}x, outputs "
              f"{'identical' if figures['overlapped_outputs_equal_serial'] else 'DIFFERENT'}")
    print(f"transformers  {hf_tokens:6d} tokens in {hf_s:7.2f}s = {figures['transformers_tok_s']:8.1f} tok/s")
    print(f"identical greedy outputs: {agree:.0%}")
    for overlap in runs:
        name = "overlapped" if overlap else "serial"
        print(f"ratio kunjax ({name}) / transformers: "
              f"{figures[f'kunjax_{name}_tok_s'] / figures['transformers_tok_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
