import torch

from treebatch.core.outputs import ScheduledChunk
from treebatch.layers.attention import paged_attention
from treebatch.core.step_layout import layout_step
from treebatch.runtime.step_inputs import build_step_inputs
from treebatch.runtime.prefix_store import PrefixKVStore

BLOCK, HEADS, KV_HEADS, DIM = 4, 6, 2, 8


def test_store_is_bounded_in_bytes_and_forgets_the_least_recently_used():
    store = PrefixKVStore(num_layers=2, bytes_per_token=10, max_bytes=1000)  # 20 bytes a token
    a = store.get(1, 16)  # 320 bytes
    assert a == [None, None]
    store.get(2, 16)
    assert store.get(1, 16) is a  # the same slots again; 1 is now the most recent
    store.get(3, 16)  # 960 bytes: all three fit
    store.get(4, 16)  # 1280 > 1000: the least recent (2) goes
    assert len(store) == 3 and store.get(1, 16) is a and store.num_bytes == 960
    assert store.get(5, 64) is None  # 1280 bytes alone: never stored
    assert len(store) == 3


def test_kept_prefix_is_reused_across_steps_and_equals_gathering():
    """Two steps of one group's decodes: the first gathers the prefix and keeps it, the second
    reads the kept copy (shown by scribbling over the prefix blocks in between: a group's
    prefix never changes while it lives, so the kept copy is what the blocks held). The decodes
    take the torch cascade here: the C kernel reads the prefix blocks in place and keeps nothing."""
    torch.manual_seed(4)
    num_blocks, num_layers = 32, 2
    kv_cache = torch.randn(num_layers, 2, num_blocks * BLOCK, KV_HEADS, DIM)
    store = PrefixKVStore(num_layers, 2 * KV_HEADS * DIM * 4, 1 << 20)
    prefix = [9, 2, 5]  # 12 shared tokens in three scattered blocks
    chunks = [
        ScheduledChunk("d1", [0], 13, prefix + [20], True, 1, group_id=7, num_shared_tokens=12),
        ScheduledChunk("d2", [0], 15, prefix + [21], True, 1, group_id=7, num_shared_tokens=12),
        ScheduledChunk("c1", [0] * 3, 12, prefix + [22], True, 1, group_id=7, num_shared_tokens=12),
    ]
    layout = layout_step(chunks, min_queries=2, min_decodes=1)
    assert layout.decodes == layout.prefills == []
    q = torch.randn(5, HEADS, DIM)
    expected = []
    for layer in range(num_layers):
        _, _, _, gather_meta = build_step_inputs(layout, BLOCK, store)
        gather_meta.cascades[0].prefix_kv = None  # the slow path: gather every time
        gather_meta.native_decode = False
        expected.append(paged_attention(q, kv_cache[layer, 0], kv_cache[layer, 1], gather_meta, DIM**-0.5, layer))
    for step in range(2):
        _, _, _, meta = build_step_inputs(layout, BLOCK, store)
        meta.native_decode = False
        kept = meta.cascades[0].prefix_kv
        assert kept is not None and len(store) == 1
        for layer in range(num_layers):
            out = paged_attention(q, kv_cache[layer, 0], kv_cache[layer, 1], meta, DIM**-0.5, layer)
            torch.testing.assert_close(out, expected[layer], atol=1e-5, rtol=1e-5)
            assert kept[layer] is not None
        for block in prefix:  # scribble: only a kept copy can still give the expected rows
            kv_cache[:, :, block * BLOCK : (block + 1) * BLOCK] = 1e3
