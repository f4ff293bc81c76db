"""MoE dispatch and combine over aiofabric (see docs/moe.md).

``reference``: the NumPy definition; ``ExpertParallel``: the host/fabric
backend (one engine per rank, any provider); ``aiofabric.moe.gpu``: the
intra-host GPU backend (CUDA IPC, kernels that write peers' buffers and spin
on flags) and the GPU-over-fabric proxy.  The GPU module imports without CuPy.
"""
from . import reference
from .host import Dispatched, ExpertParallel
from .layout import MoEConfig
from .numerics import bf16_to_f32, f32_to_bf16, fp8_decode, fp8_dequantize, fp8_encode, fp8_quantize

__all__ = ["Dispatched", "ExpertParallel", "MoEConfig", "reference", "bf16_to_f32", "f32_to_bf16",
           "fp8_decode", "fp8_encode", "fp8_quantize", "fp8_dequantize"]
