"""ModelConfig: the DeepSeek-V3 architecture as a typed dataclass, read from and written to HF config.json."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1pipe.vocab import PRESETS

DEFAULT_MTP_LAMBDA = 0.3

# Keys that transformers (v4/v5) or the official DeepSeek checkpoints write into config.json and that
# carry no information this implementation needs (or that are derived from other fields).
IGNORED_HF_KEYS = {
    "architectures", "auto_map", "transformers_version", "use_cache", "output_router_logits", "pretraining_tp",
    "head_dim", "qk_head_dim", "_name_or_path", "ep_size", "moe_layer_freq", "aux_loss_alpha", "seq_aux",
    "topk_method", "router_aux_loss_coef", "return_dict", "output_hidden_states", "output_attentions",
    "num_mtp_layers", "rope_type", "_attn_implementation_autoset", "id2label", "label2id", "problem_type",
    "model_type", "scoring_func", "generation_config", "chunk_size_feed_forward", "is_encoder_decoder",
    "tokenizer_class", "task_specific_params", "torchscript", "tf_legacy_loss", "use_bfloat16",
}

# r1pipe's own fields: written to config.json only when they differ from their defaults.
R1PIPE_FIELDS = ("fp8", "fp8_exclude", "bias_update_gamma", "seq_aux_alpha", "mtp_lambda")


@dataclass
class ModelConfig:
    """Every field of transformers' DeepseekV3Config (same names; defaults are DeepSeek-V3's) plus r1pipe's own."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    num_nextn_predict_layers: int = 1
    quantization_config: dict[str, Any] | None = None
    torch_dtype: str | None = "bfloat16"
    # r1pipe's own
    fp8: bool = False
    fp8_exclude: list[str] = field(default_factory=list)  # module-name patterns kept in high precision
    bias_update_gamma: float = 0.001
    seq_aux_alpha: float = 0.0
    mtp_lambda: float = DEFAULT_MTP_LAMBDA

    def __post_init__(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            raise ValueError("num_experts_per_tok exceeds the experts in the topk_group selected groups")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("yarn", "default"):
                raise ValueError(f"rope_scaling type {kind!r}: only 'yarn' is supported")

    # ---- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_layers_with_mtp(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    @property
    def yarn(self) -> dict[str, Any] | None:
        """The YaRN parameters, or None for plain RoPE."""
        rs = self.rope_scaling
        if rs is None or rs.get("rope_type", rs.get("type", "default")) == "default":
            return None
        return rs

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale(factor, mscale_all_dim)^2 (DeepSeek's long-context correction)."""
        scale = self.qk_head_dim ** -0.5
        y = self.yarn
        if y is not None and y.get("mscale_all_dim"):
            m = yarn_mscale(y.get("factor") or 1.0, y["mscale_all_dim"])
            scale *= m * m
        return scale

    def fp8_for(self, module_name: str) -> bool:
        """Whether the projection `module_name` is built as an FP8 linear."""
        return self.fp8 and not any(fnmatch.fnmatch(module_name, p) for p in self.fp8_exclude)

    # ---- (de)serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = True) -> "ModelConfig":
        """Build from a config.json dict (transformers v4 or v5 layout, or the official DeepSeek one)."""
        d = dict(d)
        if d.get("model_type", "deepseek_v3") not in ("deepseek_v3", "kimi_k2"):
            raise ValueError(f"model_type={d['model_type']!r}: expected 'deepseek_v3'")
        if d.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"scoring_func={d['scoring_func']!r}: only DeepSeek-V3's 'sigmoid' is supported")
        if "dtype" in d and "torch_dtype" not in d:  # transformers v5 name
            d["torch_dtype"] = d.pop("dtype")
        d.pop("dtype", None)
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        rp = d.pop("rope_parameters", None)  # transformers v5 folds rope_theta into rope_parameters
        if rp:
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            if rp.get("rope_type", rp.get("type", "default")) != "default":
                d.setdefault("rope_scaling", rp)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in IGNORED_HF_KEYS)
        if unknown and strict:
            raise ValueError(f"unknown ModelConfig key(s): {', '.join(unknown)}")
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        with open(Path(path) / "config.json") as f:
            return cls.from_dict(json.load(f), strict=False)

    def to_dict(self) -> dict[str, Any]:
        """config.json contents (the official DeepSeek-V3 layout, which transformers v4/v5 and vLLM read)."""
        out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in R1PIPE_FIELDS:
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
                if value == default:
                    continue
            if f.name == "quantization_config" and value is None:
                continue
            out[f.name] = value
        return out

    def save(self, path: str | Path) -> None:
        with open(Path(path) / "config.json", "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature correction 0.1*m*ln(s) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


