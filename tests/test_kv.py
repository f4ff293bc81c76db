"""KVLayout: the pages derived for a layer and block ids address exactly the
bytes of ``arr[layer, plane, block]`` (or the layout's equivalent) for every
layout, and bad inputs are refused."""
from __future__ import annotations

import numpy as np
import pytest

from aiofabric.kv import KVLayout, Pages

L, NB, BS, H, D = 3, 11, 4, 2, 8


def page_bytes(flat: np.ndarray, pages: list[Pages]) -> list[bytes]:
    out = []
    for p in pages:
        for i in p.indices:
            start = p.offset + p.stride * int(i)
            out.append(flat[start:start + p.page_size].tobytes())
    return out


def test_separate_planes_vllm():
    arr = np.arange(L * 2 * NB * BS * H * D, dtype=np.float16).reshape(L, 2, NB, BS, H, D)
    flat = arr.view(np.uint8).reshape(-1)
    lay = KVLayout.vllm_flash_attn(L, NB, BS, H, D, itemsize=2)
    assert lay.nbytes == flat.size and lay.page_size == BS * H * D * 2
    blocks = [7, 0, 10, 3]
    for layer in range(L):
        pages = lay.layer_pages(layer, blocks)
        assert len(pages) == 2 and lay.pages_per_layer(len(blocks)) == 8
        want = [arr[layer, plane, b].tobytes() for plane in (0, 1) for b in blocks]
        assert page_bytes(flat, pages) == want
        merged = lay.layer_pages(layer, blocks, merge=True)
        assert len(merged) == 1 and page_bytes(flat, merged) == want


def test_separate_planes_separate_tensors_with_padding():
    # K and V as separate per-layer tensors [num_blocks, block_size, heads, head_dim] in one
    # allocation with gaps: V 3 pages after the end of K, layers padded by 5 pages.
    page = BS * H * D * 4
    plane_stride, layer_stride = (NB + 3) * page, (2 * NB + 3 + 5) * page
    flat = np.random.default_rng(1).integers(0, 256, 64 + L * layer_stride, dtype=np.uint8)
    lay = KVLayout("separate", L, NB, BS, H, D, 4, layer_stride=layer_stride, plane_stride=plane_stride, offset=64)
    for layer in range(L):
        k = flat[64 + layer * layer_stride:][:NB * page].view(np.float32).reshape(NB, BS, H, D)
        v = flat[64 + layer * layer_stride + plane_stride:][:NB * page].view(np.float32).reshape(NB, BS, H, D)
        blocks = np.array([2, 9, 5])
        want = [k[b].tobytes() for b in blocks] + [v[b].tobytes() for b in blocks]
        assert page_bytes(flat, lay.layer_pages(layer, blocks)) == want
        assert page_bytes(flat, lay.layer_pages(layer, blocks, merge=True)) == want


def test_interleaved_flashinfer():
    arr = np.arange(L * NB * 2 * BS * H * D, dtype=np.float16).reshape(L, NB, 2, BS, H, D)
    flat = arr.view(np.uint8).reshape(-1)
    lay = KVLayout.flashinfer(L, NB, BS, H, D)
    assert lay.nbytes == flat.size
    for layer in range(L):
        pages = lay.layer_pages(layer, [4, 1])
        assert len(pages) == 1 and lay.pages_per_layer(2) == 2
        assert page_bytes(flat, pages) == [arr[layer, 4].tobytes(), arr[layer, 1].tobytes()]


def test_mla_latent():
    arr = np.arange(L * NB * BS * 576, dtype=np.float16).reshape(L, NB, BS, 576)
    flat = arr.view(np.uint8).reshape(-1)
    lay = KVLayout.mla(L, NB, BS)
    assert lay.nbytes == flat.size and lay.page_size == BS * 576 * 2
    for layer in range(L):
        pages = lay.layer_pages(layer, [10, 0, 6])
        assert page_bytes(flat, pages) == [arr[layer, b].tobytes() for b in (10, 0, 6)]


def test_roundtrip_and_compat():
    a = KVLayout.vllm_flash_attn(L, NB, BS, H, D)
    b = KVLayout.vllm_flash_attn(L, 3 * NB, BS, H, D)
    assert KVLayout.from_dict(a.to_dict()) == a
    assert a.compatible(b) and not a.compatible(KVLayout.flashinfer(L, NB, BS, H, D))
    assert a.blocks_for(0) == 0 and a.blocks_for(BS) == 1 and a.blocks_for(BS + 1) == 2


@pytest.mark.parametrize("kwargs, exc", [
    (dict(kind="paged"), ValueError),
    (dict(kind=1), TypeError),
    (dict(layers=0), ValueError),
    (dict(layers=256), ValueError),
    (dict(num_blocks=2.0), TypeError),
    (dict(heads=True), TypeError),
    (dict(layer_stride=10), ValueError),
    (dict(plane_stride=10), ValueError),
    (dict(offset=-1), ValueError),
    (dict(kind="mla", heads=2), ValueError),
    (dict(kind="interleaved", plane_stride=1 << 20), ValueError),
])
def test_bad_layouts(kwargs, exc):
    base = dict(kind="separate", layers=L, num_blocks=NB, block_size=BS, heads=H, head_dim=D, itemsize=2)
    with pytest.raises(exc):
        KVLayout(**{**base, **kwargs})


def test_bad_pages():
    lay = KVLayout.vllm_flash_attn(L, NB, BS, H, D)
    with pytest.raises(ValueError):
        lay.layer_pages(L, [0])
    with pytest.raises(ValueError):
        lay.layer_pages(-1, [0])
    with pytest.raises(TypeError):
        lay.layer_pages("0", [0])
    with pytest.raises(ValueError):
        lay.layer_pages(0, [NB])
    with pytest.raises(ValueError):
        lay.layer_pages(0, [-1])
    with pytest.raises(TypeError):
        lay.layer_pages(0, [1.5])
    with pytest.raises(ValueError):
        lay.layer_pages(0, [[1]])
    odd = KVLayout("separate", L, NB, BS, H, D, 2, plane_stride=NB * lay.page_size + 2)
    with pytest.raises(ValueError):
        odd.layer_pages(0, [1], merge=True)
    with pytest.raises(ValueError):
        KVLayout.from_dict({**lay.to_dict(), "bogus": 1})
    with pytest.raises(TypeError):
        KVLayout.from_dict([1])
    assert lay.layer_pages(0, [])[0].indices.size == 0
