"""Parameter shapes of public MoE models (from their published configs), for
the simulator and the benchmark.  Experts of a layer are stacked into one
parameter ``[experts, rows, cols]`` (how serving engines hold them, and a
coarser grain for the planner).  Multi-token-prediction layers are left out.

A model is a list of (count, layer params): identical layers appear once
with their count, so a planner can plan one of each kind and multiply.
"""
from __future__ import annotations

from dataclasses import dataclass

from .spec import ParamSpec

__all__ = ["MODELS", "ModelShape", "inference_dim", "model", "quantized"]


@dataclass(frozen=True)
class ModelShape:
    name: str
    groups: tuple[tuple[int, tuple[ParamSpec, ...]], ...]  #: (how many identical layers, one layer's params)

    def params(self, layers: int | None = None) -> list[ParamSpec]:
        """Every parameter, layers numbered; ``layers`` keeps only the first that many
        transformer layers (the embedding, final norm and head always)."""
        out: list[ParamSpec] = []
        n = 0
        for count, ps in self.groups:
            if count == 0:  # not a layer: embeddings, head
                out += list(ps)
                continue
            for _ in range(count):
                if layers is None or n < layers:
                    out += [ParamSpec(f"layers.{n}.{p.name}", p.shape, p.dtype) for p in ps]
                n += 1
        return out

    def compact(self) -> list[tuple[int, list[ParamSpec]]]:
        """(multiplicity, params) per kind of layer: one copy each, for planning fast."""
        return [(max(count, 1), [ParamSpec(f"{'kind' + str(k) + '.' if count else ''}{p.name}", p.shape, p.dtype)
                                 for p in ps]) for k, (count, ps) in enumerate(self.groups)]

    def numel(self) -> int:
        return sum(max(c, 1) * sum(p.numel for p in ps) for c, ps in self.groups)


def _p(name: str, *shape: int, dtype: str = "bf16") -> ParamSpec:
    return ParamSpec(name, tuple(shape), dtype)


def _mla(h: int, heads: int, q_lora: int, kv_lora: int, nope: int, rope: int, v: int) -> list[ParamSpec]:
    return [
        _p("input_layernorm", h),
        _p("self_attn.q_a_proj", q_lora, h),
        _p("self_attn.q_a_layernorm", q_lora),
        _p("self_attn.q_b_proj", heads * (nope + rope), q_lora),
        _p("self_attn.kv_a_proj_with_mqa", kv_lora + rope, h),
        _p("self_attn.kv_a_layernorm", kv_lora),
        _p("self_attn.kv_b_proj", heads * (nope + v), kv_lora),
        _p("self_attn.o_proj", h, heads * v),
        _p("post_attention_layernorm", h),
    ]


def _dense(h: int, inter: int, prefix: str = "mlp") -> list[ParamSpec]:
    return [_p(f"{prefix}.gate_proj", inter, h), _p(f"{prefix}.up_proj", inter, h), _p(f"{prefix}.down_proj", h, inter)]


def _moe(h: int, experts: int, inter: int, shared: int, bias: bool) -> list[ParamSpec]:
    out = [_p("mlp.gate", experts, h)]
    if bias:
        out.append(_p("mlp.gate.e_score_correction_bias", experts, dtype="fp32"))
    out += [_p("mlp.experts.gate_proj", experts, inter, h), _p("mlp.experts.up_proj", experts, inter, h),
            _p("mlp.experts.down_proj", experts, h, inter)]
    if shared:
        out += _dense(h, inter * shared, "mlp.shared_experts")
    return out


def _deepseek_like(name: str, layers: int, dense_layers: int, h: int, heads: int, experts: int, vocab: int,
                   inter: int = 18432, moe_inter: int = 2048) -> ModelShape:
    attn = _mla(h, heads, 1536, 512, 128, 64, 128)
    ends = (_p("embed_tokens", vocab, h), _p("norm", h), _p("lm_head", vocab, h))
    return ModelShape(name, (
        (0, ends),
        (dense_layers, tuple(attn + _dense(h, inter))),
        (layers - dense_layers, tuple(attn + _moe(h, experts, moe_inter, 1, True))),
    ))


def _qwen3_moe() -> ModelShape:
    h, heads, kv, hd = 4096, 64, 4, 128
    attn = [_p("input_layernorm", h), _p("self_attn.q_proj", heads * hd, h), _p("self_attn.k_proj", kv * hd, h),
            _p("self_attn.v_proj", kv * hd, h), _p("self_attn.o_proj", h, heads * hd),
            _p("self_attn.q_norm", hd), _p("self_attn.k_norm", hd), _p("post_attention_layernorm", h)]
    ends = (_p("embed_tokens", 151936, h), _p("norm", h), _p("lm_head", 151936, h))
    return ModelShape("qwen3-235b-a22b", ((0, ends), (94, tuple(attn + _moe(h, 128, 1536, 0, False)))))


MODELS = {
    # Kimi K2: DeepSeek-V3's architecture, 384 experts, 64 heads, one dense layer, vocab 163840 (1.03T params)
    "kimi-k2": _deepseek_like("kimi-k2", 61, 1, 7168, 64, 384, 163840),
    # DeepSeek-V3: 61 layers (3 dense), 256 routed + 1 shared expert, 128 heads, vocab 129280 (671B params)
    "deepseek-v3": _deepseek_like("deepseek-v3", 61, 3, 7168, 128, 256, 129280),
    # Qwen3-235B-A22B: 94 layers, 128 experts (8 active), GQA 64/4 heads of 128, vocab 151936
    "qwen3-235b-a22b": _qwen3_moe(),
}


def model(name: str) -> ModelShape:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}") from None


def quantized(p: ParamSpec) -> bool:
    """Whether serving holds ``p`` in FP8 (block scales): the 2-D and stacked
    linear weights except embeddings, the head and the router."""
    base = p.name.rsplit(".", 1)[-1] if "." in p.name else p.name
    return len(p.shape) >= 2 and p.dtype == "bf16" and base not in ("embed_tokens", "lm_head", "gate")


def inference_dim(p: ParamSpec) -> int | None:
    """How a serving engine splits ``p`` over a tensor/expert parallel group:
    experts by expert, column-parallel projections by rows, row-parallel ones
    (o_proj, down_proj) by columns, vocabulary by rows; norms, the router and
    MLA's low-rank down projections replicated."""
    n = p.name
    if len(p.shape) == 1 or n.endswith(("mlp.gate", "q_a_proj", "kv_a_proj_with_mqa")):
        return None
    if ".experts." in n:
        return 0
    if n.endswith(("o_proj", "down_proj")):
        return 1
    return 0
