"""FP8 block-scaled compute (DeepSeek-V3 recipe): E4M3 1x128 activation tiles, 128x128 weight blocks,
fp32 accumulation every 128 elements. quant.py is the torch reference, kernels.py the Triton kernels,
gemm.py picks a backend per tensor, linear.py holds FP8Linear. See docs/fp8.md."""
from .gemm import act_quant, fp8_gemm, weight_dequant, weight_quant
from .linear import FP8Linear, fp8_linear, set_fp8_weight
from .quant import BLOCK, FP8_DTYPE, FP8_MAX

__all__ = ["act_quant", "fp8_gemm", "weight_dequant", "weight_quant", "FP8Linear", "fp8_linear", "set_fp8_weight",
           "BLOCK", "FP8_DTYPE", "FP8_MAX"]
