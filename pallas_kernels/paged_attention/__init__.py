"""Ragged paged attention over the block-major KV pool `[NB, L, 2, BS, K, D]`, one module per backend, all with
the signature and semantics of `reference.paged_attention`:

* `reference`: pure JAX (gather the history, attend); the contract.
* `cpu`: pure JAX for CPUs (an online softmax over the history a few blocks at a time); the CPU backend.
* `tpu`: Pallas Mosaic kernel (scalar-prefetched work plan, pool blocks DMA'd from HBM, online softmax); tested
  on CPU in TPU interpret mode (`interpret=pltpu.InterpretParams()`).
* `gpu`: Pallas Mosaic GPU kernel for Hopper (TMA-pipelined pool blocks, wgmma, flash-decoding splits); tested
  on CPU in GPU interpret mode (`interpret=gpu.interpret_params()`) and by lowering for CUDA.

Backend selection lives in `pallas_kernels/__init__.py`; this package imports nothing so that picking a backend
never pulls in another's dependencies.
"""
