"""Bytes one device holds for a trainer worker and for a rollout engine worker, from a ModelShape.

Trainer (r1pipe.workers.policy with r1pipe.workers.sharding): fp32 master weights, fp32 gradients and AdamW's
two fp32 moments, each split 1/W over W FSDP workers (a single worker, or fsdp off, holds them whole). Expert
parallelism (r1pipe.workers.sharding.apply_expert_parallel) cuts a MoE layer's routed experts over ep_size
workers and replicates that cut over the W / ep_size groups: a device holds 1/ep_size of the experts (the same
1/W when ep_size = W) and 1/W of everything else, and gathers no expert. FSDP gathers, in the compute dtype, the root unit (embedding, head, MTP: FSDP2 keeps the root gathered through
forward and backward) and a block while prefetching the next, and holds a block's and the root's unsharded
gradients until they are reduce-scattered; those units hold 1/ep_size of their routed experts. With
fsdp_keep_gathered the whole model and its gradients stay gathered through the step. A KL reference / teacher
is a second fp32 model sharded like the policy. FP8 projections (model.fp8) keep fp32 masters and the bf16
gather; each forward quantizes the gathered weights (1 B + a scale per 128x128 block) and the linears save
their inputs in FP8 (1 B + a scale per 128 values) instead of bf16.

Activations are what autograd keeps for the backward of one micro-batch of `rows` x `seq_len` tokens, counted
tensor by tensor for the GPU path (memory-efficient attention: no scores kept; grouped expert GEMMs) with the
residual stream in bf16 as FSDP's bf16 gather gives it; the logits add 8 B per token and vocabulary entry (the
fp32 logits and the log-softmax the loss keeps). `activation_checkpointing` keeps only a block's attention
input (V3) or a layer's input (dense), plus one block recomputed at a time.

Engine (r1pipe.engine.LLM): the whole model (with MTP) in bf16, or FP8 projections; an engine spanning
ep_size workers holds 1/ep_size of the routed experts on each. Its KV cache (r1pipe.engine.paged_cache) holds
max_num_seqs sequences of seq_len tokens: per token and layer the MLA latent (kv_lora_rank + qk_rope_head_dim
values) for V3, K and V of the KV heads for a dense model, in the engine dtype (no FP8 cache: the FP8 column
has the same cache); each worker of an EP engine runs attention for the engine's whole batch, so each holds
the whole cache. Its activations are one layer's intermediates for max_num_batched_tokens tokens plus the
fp32 logits of max_num_seqs rows.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from r1pipe.model.info import dense_kv_bytes_per_token_per_layer, kv_cache_bytes_per_token_per_layer

from .shapes import ModelShape, Unit

GiB = 2**30
BF16 = 2  # bytes per value of the compute dtype
FP8 = 1 + 4 / 128  # an FP8 activation value with its share of a 1x128 tile's fp32 scale
OFFLOADS = ("none", "optimizer", "parameters")  # what a trainer keeps in host memory: nothing, AdamW state, or
# also the fp32 masters and their gradients (FSDP's CPU offload); the device keeps the gathered units


@dataclass(frozen=True)
class Memory:
    """Bytes on one device, by what holds them (zero where a role has none)."""

    masters: float = 0.0  # fp32 master weights (trainer)
    working: float = 0.0  # compute-dtype weights: gathered FSDP units (trainer), the model (engine)
    gradients: float = 0.0  # fp32 gradients of the masters
    reducing: float = 0.0  # bf16 gradients of gathered units before their reduce-scatter
    optimizer: float = 0.0  # AdamW's two fp32 moments
    frozen: float = 0.0  # the KL reference / teacher: fp32, sharded like the policy
    activations: float = 0.0
    kv_cache: float = 0.0
    host: float = 0.0  # moved to host memory by offload (not counted on the device)

    @property
    def parameters(self) -> float:
        return self.masters + self.working

    @property
    def grads(self) -> float:
        return self.gradients + self.reducing

    @property
    def total(self) -> float:
        return self.parameters + self.grads + self.optimizer + self.frozen + self.activations + self.kv_cache


@dataclass(frozen=True)
class TrainerSetup:
    """What a trainer worker's memory depends on besides the model (the stage's parallelism and batch)."""

    workers: int
    rows: int  # sequences per micro-batch on one worker
    seq_len: int  # tokens per sequence
    ep_size: int = 1
    fsdp: bool = True
    keep_gathered: bool = False
    activation_checkpointing: bool = False
    trains_mtp: bool = False  # V3's MTP modules get gradients (sft with mtp, GRPO's draft loss)
    frozen: ModelShape | None = None  # a KL reference or teacher held beside the policy, sharded like it
    offload: str = "none"  # OFFLOADS

    def __post_init__(self) -> None:
        if self.offload not in OFFLOADS:
            raise ValueError(f"offload={self.offload!r}: one of {OFFLOADS}")


@dataclass(frozen=True)
class EngineSetup:
    """What a rollout engine worker's memory depends on besides the model."""

    max_num_seqs: int
    seq_len: int
    max_num_batched_tokens: int = 8192
    ep_size: int = 1
    speculative_k: int = 0  # > 0: the MTP module's cache layer too


def _split(params: float, routed: float, workers: int, ep_size: int, sharded: bool) -> float:
    """Parameters a trainer device holds of `params` (`routed` of them routed experts)."""
    if sharded and ep_size > 1:  # the experts cut over ep_size and replicated over the W / ep_size groups
        return (params - routed) / workers + routed / ep_size
    if sharded:
        return params / workers
    return params - routed + routed / ep_size


def trainer_memory(shape: ModelShape, s: TrainerSetup, fp8: bool = False) -> Memory:
    """Bytes on one trainer device (the module docstring says what is counted)."""
    sharded = s.fsdp and s.workers > 1
    held = _split(shape.params, shape.routed, s.workers, s.ep_size, sharded)
    mtp = shape.mtp if shape.mtp is not None and not s.trains_mtp else None
    trained = held - (_split(mtp.params, mtp.routed, s.workers, s.ep_size, sharded) if mtp else 0.0)
    if not sharded:  # autocast's cache: every weight cast once to bf16 for the step
        working = sum(_gathered(u, s.ep_size, fp8) for u in shape.units)
        reducing = 0.0
    elif s.keep_gathered:
        working = sum(_gathered(u, s.ep_size, fp8) for u in shape.units)
        reducing = BF16 * (sum(u.per_rank(s.ep_size) for u in shape.units) - (mtp.per_rank(s.ep_size) if mtp else 0))
    else:
        block = max(shape.blocks, key=lambda u: u.per_rank(s.ep_size))
        working = _gathered(shape.root, s.ep_size, fp8) + 2 * _gathered(block, s.ep_size, fp8)
        root = shape.root.per_rank(s.ep_size) - (mtp.per_rank(s.ep_size) if mtp else 0)
        reducing = BF16 * (root + block.per_rank(s.ep_size))
    m = Memory(masters=4 * held, working=working, gradients=4 * trained, reducing=reducing, optimizer=8 * trained,
               frozen=4 * _split(s.frozen.params, s.frozen.routed, s.workers, s.ep_size, sharded) if s.frozen else 0.0,
               activations=s.rows * s.seq_len * activation_bytes_per_token(shape, s, fp8))
    if s.offload == "optimizer":
        return replace(m, optimizer=0.0, host=m.optimizer)
    if s.offload == "parameters":
        return replace(m, masters=0.0, gradients=0.0, optimizer=0.0, host=m.masters + m.gradients + m.optimizer)
    return m


def _gathered(unit: Unit, ep_size: int, fp8: bool) -> float:
    """A gathered unit's bf16 weights, plus with FP8 the quantized copy its forward makes of the projections."""
    bf16 = BF16 * unit.per_rank(ep_size)
    if not fp8:
        return bf16
    quantized = unit.quantized + 4 * unit.scale_blocks + (unit.routed_quantized + 4 * unit.routed_scale_blocks) / ep_size
    return bf16 + quantized


def _input(width: float, consumers: int, fp8: bool) -> float:
    """Bytes per token kept of a linear input of `width` values: one bf16 tensor shared by its `consumers`,
    or one FP8 copy per consuming FP8 linear."""
    if consumers == 0:
        return 0.0
    return consumers * FP8 * width if fp8 else BF16 * width


def _norm(width: float) -> float:
    """An RMSNorm's own saved tensors: its input upcast to fp32 and the normalised value in bf16."""
    return (4 + BF16) * width


def v3_attention_bytes(shape: ModelShape, fp8: bool) -> float:
    """Bytes per token an MLA block keeps (input norm to o_proj's input), as listed in the module docstring."""
    c = shape.v3
    assert c is not None
    H, D, qk = c.num_attention_heads, c.hidden_size, c.qk_head_dim
    kv = c.kv_lora_rank + c.qk_rope_head_dim
    n = _norm(D) + _input(D, 2, fp8)  # q_a (or q) and kv_a projections read the normed input
    if c.q_lora_rank is not None:
        n += _norm(c.q_lora_rank) + _input(c.q_lora_rank, 1, fp8)
    n += BF16 * H * qk  # the query projection's output (RoPE keeps views of it)
    n += BF16 * kv + _norm(c.kv_lora_rank) + _input(c.kv_lora_rank, 1, fp8)  # latent + RoPE key, its norm
    n += BF16 * H * (c.qk_nope_head_dim + c.v_head_dim)  # kv_b's output (V is a view of it)
    n += 2 * BF16 * H * qk + BF16 * H * c.v_head_dim + 4 * H  # attention's q, k, output, log-sum-exp
    return n + _input(H * c.v_head_dim, 1, fp8)  # o_proj's input


def v3_ffn_bytes(shape: ModelShape, layer: int, fp8: bool) -> float:
    """Bytes per token block `layer`'s FFN keeps: dense SwiGLU, or router + routed experts + shared experts."""
    c = shape.v3
    assert c is not None
    D = c.hidden_size
    if not c.is_moe_layer(layer):
        return _norm(D) + _input(D, 2, fp8) + 3 * BF16 * c.intermediate_size + _input(c.intermediate_size, 1, fp8)
    k, I = c.num_experts_per_tok, c.moe_intermediate_size
    shared = c.n_shared_experts * I
    n = _norm(D) + _input(D, 2 if shared else 0, fp8) + 4 * D + 4 * c.n_routed_experts  # router in fp32
    n += 2 * FP8 * k * D if fp8 else BF16 * k * D  # each token's rows sorted by expert (gate and up read them)
    n += 4 * BF16 * k * I + _input(k * I, 1, fp8)  # gate, silu, up, gated product; down's input
    n += BF16 * k * D  # the experts' outputs, summed back per token
    if shared:
        n += 3 * BF16 * shared + _input(shared, 1, fp8)
    return n


def dense_layer_bytes(shape: ModelShape) -> float:
    """Bytes per token a Llama / Qwen2 decoder layer keeps (transformers' modules under bf16 autocast)."""
    s = shape.dense
    assert s is not None
    q, kv, D = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim, s.hidden_size
    attention = _norm(D) + BF16 * D + BF16 * (3 * q + 2 * kv) + 4 * s.num_attention_heads  # q, k, v, out, o's input
    return attention + _norm(D) + BF16 * D + 4 * BF16 * s.intermediate_size


def head_bytes(shape: ModelShape) -> float:
    """The final norm, the head's input and the logits (fp32, and the log-softmax the loss keeps) per token."""
    return _norm(shape.hidden_size) + BF16 * shape.hidden_size + 8 * shape.vocab_size


def activation_bytes_per_token(shape: ModelShape, s: TrainerSetup, fp8: bool = False) -> float:
    """Bytes per token of a training micro-batch kept for the backward (module docstring)."""
    if shape.v3 is None:
        layer = dense_layer_bytes(shape)
        kept = BF16 * shape.hidden_size if s.activation_checkpointing else layer
        return shape.dense.num_hidden_layers * kept + (layer if s.activation_checkpointing else 0.0) + head_bytes(shape)
    c = shape.v3
    attention = v3_attention_bytes(shape, fp8)
    kept = _norm(c.hidden_size) + BF16 * c.hidden_size if s.activation_checkpointing else attention
    n = sum(kept + v3_ffn_bytes(shape, i, fp8) for i in range(c.num_hidden_layers)) + head_bytes(shape)
    if s.activation_checkpointing:
        n += attention  # one block's attention recomputed in the backward
    if s.trains_mtp:  # each MTP module: two input norms, eh_proj, a block, its head
        L, D = c.num_hidden_layers, c.hidden_size
        mtp_layer = 2 * _norm(D) + _input(2 * D, 1, fp8) + attention + v3_ffn_bytes(shape, L, fp8) + head_bytes(shape)
        n += c.num_nextn_predict_layers * mtp_layer
    return n


def kv_bytes_per_token(shape: ModelShape, speculative_k: int = 0) -> int:
    """The engine's bf16 cache bytes per token over all cached layers (one more with MTP drafts)."""
    if shape.v3 is not None:
        latent, _ = kv_cache_bytes_per_token_per_layer(shape.v3, BF16)
        return latent * (shape.v3.num_hidden_layers + (1 if speculative_k else 0))
    return dense_kv_bytes_per_token_per_layer(shape.dense, BF16) * shape.dense.num_hidden_layers


def engine_memory(shape: ModelShape, s: EngineSetup, fp8: bool = False) -> Memory:
    """Bytes on one rollout worker's device (module docstring)."""
    if fp8:
        weights = sum(u.fp8_bytes(s.ep_size) for u in shape.units)
    else:
        weights = BF16 * sum(u.per_rank(s.ep_size) for u in shape.units)
    T, D = s.max_num_batched_tokens, shape.hidden_size
    if shape.v3 is not None:
        c = shape.v3
        moe = c.num_experts_per_tok * (D + 3 * c.moe_intermediate_size) if c.n_routed_experts else 0
        widest = max(moe, 3 * c.intermediate_size, c.num_attention_heads * (c.kv_lora_rank + c.qk_head_dim))
    else:
        widest = 3 * shape.dense.intermediate_size
    activations = T * (BF16 * widest + 4 * D) + 2 * 4 * s.max_num_seqs * shape.vocab_size
    return Memory(working=weights, activations=activations,
                  kv_cache=s.max_num_seqs * s.seq_len * kv_bytes_per_token(shape, s.speculative_k))
