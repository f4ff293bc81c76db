"""Paged KV-cache layouts as serving engines lay them out (sans-IO).

A :class:`KVLayout` describes where every block of every layer lives in one
registered allocation, and derives, for a layer and a list of block ids, the
``(offset, page_size, stride, indices)`` entries that ``write_pages`` takes:
strides and block numbers, never copies.  See docs/kv-streaming.md.

Kinds (per layer, ``L`` layers ``layer_stride`` bytes apart):

``"separate"``     K and V planes, each ``[num_blocks, block_size, heads, head_dim]``
                   (vLLM FlashAttention: ``[2, num_blocks, block_size, heads, head_dim]``);
                   the V plane starts ``plane_stride`` bytes after the K plane.
``"interleaved"``  K and V of a block together: ``[num_blocks, 2, block_size, heads, head_dim]``
                   (FlashInfer NHD).
``"mla"``          one latent plane ``[num_blocks, block_size, head_dim]`` (DeepSeek MLA:
                   head_dim 576 = 512 latent + 64 rope), ``heads`` must be 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from ._checks import int_arg as _int

__all__ = ["KVLayout", "Pages", "KINDS"]

KINDS = ("separate", "interleaved", "mla")


class Pages(NamedTuple):
    """One ``write_pages`` entry: page ``k`` is ``page_size`` bytes at
    ``offset + stride * indices[k]`` of the cache region."""

    offset: int
    page_size: int
    stride: int
    indices: np.ndarray


@dataclass(frozen=True)
class KVLayout:
    """Geometry of a paged KV cache in one registered region.  All sizes in
    bytes except the counts; ``layer_stride``/``plane_stride`` default to the
    packed values (``None`` -> packed)."""

    kind: str
    layers: int
    num_blocks: int
    block_size: int
    heads: int
    head_dim: int
    itemsize: int
    layer_stride: int | None = None
    plane_stride: int | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        if type(self.kind) is not str:
            raise TypeError(f"kind must be a str, not {type(self.kind).__name__}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("layers", "num_blocks", "block_size", "heads", "head_dim", "itemsize"):
            object.__setattr__(self, name, _int(name, getattr(self, name)))
        object.__setattr__(self, "offset", _int("offset", self.offset, 0))
        if self.layers > 255:
            raise ValueError(f"at most 255 layers (the immediate's layer field), got {self.layers}")
        if self.kind == "mla" and self.heads != 1:
            raise ValueError(f"an MLA latent cache has heads=1, got {self.heads}")
        if self.kind != "separate" and self.plane_stride is not None:
            raise ValueError("plane_stride applies to kind='separate' only")
        if self.kind == "separate":
            ps = self.num_blocks * self.block_bytes if self.plane_stride is None else self.plane_stride
            ps = _int("plane_stride", ps)
            if ps < self.num_blocks * self.block_bytes:
                raise ValueError(f"plane_stride {ps} is smaller than a plane ({self.num_blocks * self.block_bytes})")
            object.__setattr__(self, "plane_stride", ps)
        packed = self._packed_layer_bytes()
        ls = packed if self.layer_stride is None else _int("layer_stride", self.layer_stride)
        if ls < packed:
            raise ValueError(f"layer_stride {ls} is smaller than a layer ({packed} bytes)")
        object.__setattr__(self, "layer_stride", ls)

    # -- constructors for the common engines ---------------------------------

    @classmethod
    def vllm_flash_attn(cls, layers: int, num_blocks: int, block_size: int, heads: int, head_dim: int,
                        itemsize: int = 2, **kw: Any) -> KVLayout:
        """vLLM FlashAttention: per layer ``[2, num_blocks, block_size, heads, head_dim]``."""
        return cls("separate", layers, num_blocks, block_size, heads, head_dim, itemsize, **kw)

    @classmethod
    def flashinfer(cls, layers: int, num_blocks: int, block_size: int, heads: int, head_dim: int,
                   itemsize: int = 2, **kw: Any) -> KVLayout:
        """FlashInfer (NHD): per layer ``[num_blocks, 2, block_size, heads, head_dim]``."""
        return cls("interleaved", layers, num_blocks, block_size, heads, head_dim, itemsize, **kw)

    @classmethod
    def mla(cls, layers: int, num_blocks: int, block_size: int, latent_dim: int = 576,
            itemsize: int = 2, **kw: Any) -> KVLayout:
        """MLA latent cache: per layer ``[num_blocks, block_size, latent_dim]``."""
        return cls("mla", layers, num_blocks, block_size, 1, latent_dim, itemsize, **kw)

    # -- geometry -------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        """One block of one plane (K, V or the latent): block_size * heads * head_dim * itemsize."""
        return self.block_size * self.heads * self.head_dim * self.itemsize

    @property
    def page_size(self) -> int:
        """The bytes one page (one write) moves: a plane's block, or K+V of a block when interleaved."""
        return 2 * self.block_bytes if self.kind == "interleaved" else self.block_bytes

    @property
    def planes(self) -> int:
        return 2 if self.kind == "separate" else 1

    def _packed_layer_bytes(self) -> int:
        if self.kind == "separate":
            assert self.plane_stride is not None
            return self.plane_stride + self.num_blocks * self.block_bytes
        return self.num_blocks * self.page_size

    @property
    def nbytes(self) -> int:
        """Bytes the region must hold (from its start)."""
        assert self.layer_stride is not None
        return self.offset + (self.layers - 1) * self.layer_stride + self._packed_layer_bytes()

    def pages_per_layer(self, n_blocks: int) -> int:
        """How many pages (immediates) one layer of a request of ``n_blocks`` blocks is."""
        return self.planes * n_blocks

    def blocks_for(self, tokens: int) -> int:
        """Blocks needed for ``tokens`` tokens."""
        return -(-_int("tokens", tokens, 0) // self.block_size)

    def _blocks(self, blocks: Any) -> np.ndarray:
        arr = np.asarray(blocks)
        if arr.ndim == 1 and arr.size == 0:
            return np.zeros(0, np.int64)
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"blocks must hold integers, not {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(f"blocks must be one-dimensional, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_blocks):
            raise ValueError(f"block ids must lie in [0, {self.num_blocks}), got {arr.min()}..{arr.max()}")
        return np.ascontiguousarray(arr, np.int64)

    def _layer(self, layer: Any) -> int:
        layer = _int("layer", layer, 0)
        if layer >= self.layers:
            raise ValueError(f"layer {layer} out of range (layers={self.layers})")
        return layer

    def layer_offset(self, layer: int) -> int:
        assert self.layer_stride is not None
        return self.offset + self._layer(layer) * self.layer_stride

    def layer_pages(self, layer: int, blocks: Any, *, merge: bool = False) -> list[Pages]:
        """The ``write_pages`` entries covering ``blocks`` of ``layer``.

        "separate": two entries (K plane, V plane) with the same indices, or
        with ``merge=True`` (needs ``plane_stride`` a multiple of the page) one
        entry whose indices are ``blocks`` then ``blocks + plane_stride/page``.
        "interleaved" and "mla": one entry.  Indices are block ids."""
        base = self.layer_offset(layer)
        idx = self._blocks(blocks)
        page = self.page_size
        if self.kind != "separate":
            return [Pages(base, page, page, idx)]
        assert self.plane_stride is not None
        if not merge:
            return [Pages(base, page, page, idx), Pages(base + self.plane_stride, page, page, idx.copy())]
        if self.plane_stride % page:
            raise ValueError(f"merge=True needs plane_stride ({self.plane_stride}) to be a multiple of the page ({page})")
        return [Pages(base, page, page, np.concatenate([idx, idx + self.plane_stride // page]))]

    def compatible(self, other: KVLayout) -> bool:
        """Whether pages of ``self`` can be written into ``other`` entry by entry
        (same kind, layers and page geometry; block counts and strides may differ)."""
        return (self.kind, self.layers, self.block_size, self.heads, self.head_dim, self.itemsize) == (
            other.kind, other.layers, other.block_size, other.heads, other.head_dim, other.itemsize)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> KVLayout:
        if not isinstance(d, dict):
            raise TypeError(f"a layout is a dict, not {type(d).__name__}")
        names = {"kind", "layers", "num_blocks", "block_size", "heads", "head_dim", "itemsize",
                 "layer_stride", "plane_stride", "offset"}
        if set(d) - names:
            raise ValueError(f"unknown layout fields {sorted(set(d) - names)}")
        return cls(**d)
