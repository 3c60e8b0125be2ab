"""The host-side block book: allocation, reference counts, the prefix cache, and the accounting invariant."""

import random

import pytest

from kunjax.block_manager import NULL_BLOCK, BlockAllocator, OutOfBlocks, chain_hash


def test_null_block_is_never_handed_out_and_books_balance():
    a = BlockAllocator(8)
    blocks = a.allocate(7)
    assert NULL_BLOCK not in blocks and sorted(blocks) == list(range(1, 8))
    assert (a.num_free, a.num_used, a.num_cached) == (0, 7, 0)
    a.check()
    with pytest.raises(OutOfBlocks, match="need 1 KV blocks, 0 allocatable"):
        a.allocate(1)
    a.free(blocks)
    assert a.num_free == 7
    a.check()


def test_double_free_is_an_error():
    a = BlockAllocator(4)
    (b,) = a.allocate(1)
    a.free([b])
    with pytest.raises(ValueError, match="double free"):
        a.free([b])


def test_prefix_cache_reuse_and_lru_eviction():
    a = BlockAllocator(5)  # 4 usable
    h1 = chain_hash(None, [1, 2])
    h2 = chain_hash(h1, [3, 4])
    b1, b2 = a.allocate(2)
    a.register(b1, h1)
    a.register(b2, h2)
    a.free([b1, b2])
    assert (a.num_free, a.num_used, a.num_cached) == (2, 0, 2)
    a.check()
    # A new request with the same prefix gets the same blocks back, referenced.
    assert a.match([h1, h2, chain_hash(h2, [5, 6])]) == [b1, b2]
    assert a.refcount(b1) == 1 and a.num_cached == 0
    a.free([b1, b2])
    # Allocation evicts cached blocks only once the free list is empty; the tail block goes first.
    got = a.allocate(3)
    assert b2 in got and b1 not in got and a.num_cached == 1
    assert a.match([h1]) == [b1] and a.match([h2]) == []
    a.check()


def test_chain_hash_depends_on_the_whole_prefix():
    assert chain_hash(chain_hash(None, [1]), [2]) != chain_hash(chain_hash(None, [9]), [2])


def test_random_operations_keep_the_invariant():
    rng = random.Random(0)
    a = BlockAllocator(33)
    held: list[list[int]] = []
    hashes = [chain_hash(None, [i]) for i in range(20)]
    for _ in range(2000):
        op = rng.random()
        if op < 0.4 and a.num_allocatable:
            held.append(a.allocate(rng.randint(1, min(4, a.num_allocatable))))
            if rng.random() < 0.5:
                a.register(held[-1][0], rng.choice(hashes))
        elif op < 0.6:
            got = a.match([rng.choice(hashes)])
            if got:
                held.append(got)
        elif held:
            a.free(held.pop(rng.randrange(len(held))))
        a.check()
        assert a.num_used == len({b for h in held for b in h})
