"""DeepSeek-V3: MLA, DeepSeekMoE, FP8, MTP, Hugging Face checkpoint I/O (imported as r1pipe.model)."""
from .attention import SharedPrefix
from .cache import DenseLatentCache, LatentCache
from .checkpoint import dequantize_blocks, load_pretrained, save_pretrained
from .config import ModelConfig
from .linear import make_linear
from .loss import lm_loss, masked_ce_sum
from .precision import Precision, apply_precision, parse_dtype
from .transformer import ModelOutput, Transformer

__all__ = [
    "SharedPrefix",
    "ModelConfig", "Transformer", "ModelOutput", "LatentCache", "DenseLatentCache", "load_pretrained",
    "save_pretrained", "dequantize_blocks", "lm_loss", "make_linear", "masked_ce_sum",
    "Precision", "apply_precision", "parse_dtype",
]
