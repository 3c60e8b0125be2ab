"""The host-side block books: the segmented allocator, reference counts, the radix prefix index, the invariant."""

import random

import pytest

from kunjax.blocks import NULL_BLOCK, BlockAllocator, OutOfBlocks, PrefixIndex


def test_null_block_is_never_handed_out_and_books_balance():
    a = BlockAllocator(8)
    blocks = a.allocate(7)
    assert NULL_BLOCK not in blocks and blocks == list(range(1, 8))  # lowest ids first
    assert (a.num_free, a.num_used, a.num_cached) == (0, 7, 0)
    a.check()
    with pytest.raises(OutOfBlocks, match="need 1 KV blocks, 0 free"):
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


def test_segments_pack_low_ids_and_the_extension_can_close():
    a = BlockAllocator(num_base=8, num_ext=4, taken=[3, 3, 5])
    assert a.total == 11 and a.num_used == 2 and a.refcount(3) == 2
    assert a.allocate(3) == [1, 2, 4]  # lowest first, skipping held ids
    a.free([2])
    assert a.allocate(1) == [2]
    a.ext_open = False
    assert a.num_free_allocatable == len([b for b in range(1, 8) if a.is_free(b)])
    with pytest.raises(OutOfBlocks):
        a.allocate(a.num_free_allocatable + 1)
    a.ext_open = True
    assert a.allocate(3) == [6, 7, 8]  # base first, then the extension
    a.free([3])
    assert a.refcount(3) == 1
    a.check()


def _index(num_blocks: int = 9, stages: int = 1, bs: int = 2) -> PrefixIndex:
    return PrefixIndex([BlockAllocator(num_blocks) for _ in range(stages)], bs)


def _hold(index: PrefixIndex, tokens: list[int]) -> tuple[list[tuple[int, ...]], list]:
    """Compute `tokens` as a request would: match, then allocate and insert its new full blocks. Returns its
    blocks (one tuple of stage ids per logical block) and its path of nodes."""
    nodes = index.match(tokens)
    held = [n.blocks for n in nodes]
    bs = index.block_size
    for j in range(len(nodes), len(tokens) // bs):
        blocks = tuple(a.allocate(1)[0] for a in index.allocators)
        parent = nodes[-1] if nodes else None
        node = index.insert(parent, tuple(tokens[j * bs:(j + 1) * bs]), blocks)
        if node.blocks != blocks:  # an equal node came first: share it
            for a, b in zip(index.allocators, blocks, strict=True):
                a.free([b])
        held.append(node.blocks)
        nodes.append(node)
    return held, nodes


def _release(index: PrefixIndex, holding: tuple[list[tuple[int, ...]], list]) -> None:
    held, nodes = holding
    for blocks in held:
        for a, b in zip(index.allocators, blocks, strict=True):
            a.free([b])
    index.release(nodes)


def test_prefix_reuse_by_path_and_lru_eviction_leaves_first():
    index = _index()
    a = index.allocators[0]
    first = _hold(index, [1, 2, 3, 4, 5])  # two full blocks indexed
    assert len(first[1]) == 2 and a.num_used == 2
    _release(index, first)
    assert (a.num_free, a.num_used, a.num_cached) == (6, 0, 2)
    # The same prefix is found again (at least one token is left to compute), and referenced.
    again = index.match([1, 2, 3, 4, 9])
    assert [n.blocks for n in again] == [n.blocks for n in first[1]] and a.num_cached == 0
    # A different second chunk under the same first: a branch of the tree.
    assert index.longest([1, 2, 9, 9, 9]) == again[:1]
    _release(index, ([n.blocks for n in again], again))
    # Eviction takes the leaf (the tail block) before its parent.
    assert index.evict(1) == 1 and a.num_cached == 1 and len(index.longest([1, 2, 3, 4, 5])) == 1
    index.check()
    a.check()


def test_a_block_held_by_a_request_is_never_evicted():
    index = _index(num_blocks=4)
    held = _hold(index, [1, 2, 3, 4, 5])
    assert index.evict(5) == 0 and all(index.allocators[0].refcount(n.blocks[0]) == 1 for n in held[1])
    _release(index, held)
    assert index.evict(5) == 2 and index.allocators[0].num_free == 3



def test_eviction_passes_over_referenced_stale_nodes_and_takes_them_once_released():
    """A pipeline's index lists its stale nodes (cached before the fuse) even while requests still read them;
    eviction passes over those to the cached nodes behind them (least recently used first, leaves first), and
    takes the stale ones once nobody references them."""
    index = _index(num_blocks=24, stages=2)
    home = index.allocators[0]
    stale, parent = [], None
    for i, old in enumerate((3, 4, 5)):  # a chain of three stale nodes on stage 0's device, read by a request
        parent = index.adopt_stale(parent, (50 + i, 50 + i), 0, old)
        stale.append(parent)
        home.ref([old * 2, old * 2 + 1])
    chain = _hold(index, [1, 2, 3, 4, 5])  # two ordinary nodes, cached once released
    _release(index, chain)
    index.check()
    assert index.evict(10) == 2 and len(index) == 3  # the ordinary leaf, then its parent; no stale node
    assert index.longest([1, 2, 3]) == []
    index.check()
    for node in stale:  # the request that read them is gone
        home.free([b for _, b in index.held(node)])
    assert index.evict(10) == 3 and len(index) == 0 and home.num_free == home.num_blocks - 1
    index.check()


def test_every_stage_holds_its_part_of_a_node():
    index = _index(num_blocks=6, stages=3)
    holding = _hold(index, [7, 7, 8, 8, 9])
    assert all(len(n.blocks) == 3 for n in holding[1])
    _release(index, holding)
    assert all(a.num_cached == 2 for a in index.allocators)
    index.check()


def test_random_operations_keep_the_invariant():
    rng = random.Random(0)
    index = _index(num_blocks=33, bs=2)
    a = index.allocators[0]
    held: list[tuple] = []
    for _ in range(1500):
        op = rng.random()
        if op < 0.5:
            tokens = [rng.randrange(3) for _ in range(rng.randint(1, 9))]
            if len(tokens) // 2 > a.num_free_allocatable:
                index.evict(len(tokens) // 2 - a.num_free_allocatable)
            if len(tokens) // 2 - len(index.longest(tokens)) <= a.num_free_allocatable:
                held.append(_hold(index, tokens))
        elif held:
            _release(index, held.pop(rng.randrange(len(held))))
        index.check()
        a.check()
        assert a.num_used == len({b[0] for h, _ in held for b in h})
