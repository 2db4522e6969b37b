"""The LLM class: continuous-batched generation over the paged cache, on r1pipe's own DeepSeek-V3 or a dense
transformers Llama / Qwen2 (r1pipe.engine.families: one EngineModel adapter per family).

Each engine step admits waiting prompts (one shared prefill per prompt for its n samples) and resumes
preempted sequences (recomputing their cache), gives every running sequence the blocks the step writes,
then lets the decoding strategy advance all running sequences at once: r1pipe.engine.decoding
(one token per step in ONE batched forward) or, with speculative_k > 0, r1pipe.engine.speculative (k MTP
drafts verified in one forward). The model runner (r1pipe.engine.runner) plans and runs each forward.
"""
from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Iterator, Sequence as Seq
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from r1pipe.causal_lm import V3, context_length
from r1pipe.engine.decoding import PlainDecoding
from r1pipe.engine.families import check_supported, load_engine_model
from r1pipe.engine.lockstep import Lockstep, engine_shard
from r1pipe.engine.paged_cache import PagedCache
from r1pipe.engine.params import CompletionOutput, RequestOutput, SamplingParams, pair_requests
from r1pipe.engine.runner import Batch, ModelRunner
from r1pipe.engine.scheduler import Scheduler, Sequence, SequenceGroup
from r1pipe.engine.speculative import SpeculativeDecoding
from r1pipe.engine.stopping import StopChecker
from r1pipe.engine.tokenizer import TokenizerAdapter
from r1pipe.errors import ConfigError
from r1pipe.model import parse_dtype
from r1pipe.model.expert_parallel import experts_held_elsewhere
from r1pipe.model.fp8 import FP8_DTYPE, set_fp8_weight
from r1pipe.tracking.progress import StepProgress

_SHARED_ALIASES = (".embed_tokens.weight", ".shared_head.head.weight")  # MTP copies of shared weights



def prompt_token_budget(model_path: str | Path, engine_options: dict[str, Any], max_tokens: int) -> int:
    """The longest prompt an LLM built with `engine_options` accepts for `max_tokens` new tokens:
    its context (max_model_len, else the model's max_position_embeddings) less the completion and
    the speculative lookahead, as LLM.generate checks it. Reads config.json only (any supported family)."""
    check_supported(model_path)
    context = engine_options.get("max_model_len") or context_length(model_path)
    return int(context) - max_tokens - int(engine_options.get("speculative_k", 0) or 0)

def set_weight(state: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """Write `value` into the model tensor state[name] in place (state: a state_dict(keep_vars=True)): cast to its
    dtype, or, for an FP8 weight, quantized in 128x128 blocks into it and its `{name}_scale_inv` scales."""
    target = state[name]
    if target.dtype == FP8_DTYPE:
        set_fp8_weight(target.data, state[name + "_scale_inv"], value)
    else:
        target.data.copy_(value.to(target.device, target.dtype))


class LLM:
    """Offline batched generation, shaped like vllm.LLM.

    model: a Hugging Face-format checkpoint directory whose config.json model_type is deepseek_v3 (r1pipe's
    DeepSeek-V3), llama or qwen2 (transformers' dense models), or such a model object (an
    r1pipe.model.Transformer or a transformers LlamaForCausalLM / Qwen2ForCausalLM, used in place, moved to
    device/dtype); any other model type is a ConfigError naming the supported ones. tokenizer: a directory
    or tokenizer object (default: the checkpoint dir; without one, prompts must be token ids and texts are empty). num_blocks: cache blocks of
    block_size tokens (default: enough for max_num_seqs sequences of max_model_len tokens, capped by
    cache_memory_gb). speculative_k: draft tokens per step from the MTP module (0 = off; DeepSeek-V3 only).
    cuda_graphs: replay plain decode steps from one CUDA graph per batch-size bucket (None: on exactly on CUDA
    devices for DeepSeek-V3, off for dense models, which refuse True; see r1pipe.engine.cuda_graphs). fp8
    (DeepSeek-V3 only): hold the projections (attention, MLPs, routed and shared experts; not
    fp8_exclude) as FP8 weights in 128x128 blocks computing on 1x128 activation tiles (r1pipe.model.fp8), the
    rest in `dtype`; a model object is then copied first (its own weights stay as they are), and
    `update_weights` quantizes what it is given. ep_size > 1 (DeepSeek-V3 only): this process is one of the
    ep_size processes of the default torch.distributed group that together make one expert-parallel engine
    (r1pipe.engine.lockstep): it holds only its rank's share of the routed experts, every process must generate
    the same requests with the same seeds at once, and `update_weights` skips the other ranks' experts; no CUDA
    graphs.
    """

    def __init__(self, model: str | Path | nn.Module, tokenizer: Any = None, dtype: torch.dtype | str = torch.float32,
                 device: str | torch.device = "cpu", max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 block_size: int = 16, num_blocks: int | None = None, seed: int = 0, speculative_k: int = 0,
                 max_model_len: int | None = None, cache_memory_gb: float = 0.5, cuda_graphs: bool | None = None,
                 fp8: bool = False, ep_size: int = 1) -> None:
        dtype = parse_dtype(dtype, key="dtype")  # "bfloat16" from a recipe (rl.rollout.engine.dtype) or a torch.dtype
        self.device = torch.device(device)
        if cuda_graphs and ep_size > 1:
            raise ConfigError(f"cuda_graphs=True with ep_size={ep_size}: the expert-parallel dispatch reads its split "
                              "sizes on the host, which a CUDA graph cannot replay (leave cuda_graphs unset)")
        expert_shard = engine_shard(ep_size)
        self.family = load_engine_model(model, dtype, self.device, fp8, expert_shard)
        if isinstance(model, (str, Path)):
            tokenizer = model if tokenizer is None else tokenizer
        self.model = self.family.module  # the torch module: its state-dict names are the checkpoint's
        self.experts_elsewhere = experts_held_elsewhere(self.model)  # other ranks' experts (update_weights skips)
        self.fp8 = bool(fp8)
        self.config = self.family.config
        facts = self.family.facts
        self.tokenizer = TokenizerAdapter.load(tokenizer, eos_token_id=facts.eos_token_id)
        eos = self.tokenizer.eos_token_id if self.tokenizer else facts.eos_token_id
        # configs may list several EOS ids
        self.eos_token_ids: frozenset[int] = frozenset(
            [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])])
        self.vocab_size = facts.vocab_size
        self.num_moe_layers = facts.num_moe_layers
        if speculative_k and facts.num_nextn_predict_layers < 1:
            what = "r1pipe's DeepSeek-V3 only" if facts.model_type != V3 else "num_nextn_predict_layers >= 1"
            raise ConfigError(f"speculative_k={speculative_k}: speculative decoding drafts with an MTP module, which "
                              f"this {facts.model_type} model does not have ({what})")
        self.speculative_k = speculative_k
        self.max_model_len = max_model_len or facts.max_position_embeddings
        cache_layers = facts.num_hidden_layers + (1 if speculative_k else 0)
        per_token = cache_layers * facts.cache_heads * sum(facts.cache_widths) * torch.finfo(dtype).bits // 8
        if num_blocks is None:
            wanted = max_num_seqs * -(-self.max_model_len // block_size) + 1
            affordable = int(cache_memory_gb * 2**30) // (per_token * block_size)
            num_blocks = max(2, min(wanted, affordable))
        self.cache = PagedCache(cache_layers, num_blocks, block_size, facts.cache_widths, facts.cache_heads,
                                dtype=dtype, device=self.device)
        if cuda_graphs and not self.family.supports_cuda_graphs:
            raise ConfigError(f"cuda_graphs=True: CUDA graphs of the decode step are for r1pipe's DeepSeek-V3; this "
                              f"is a {facts.model_type} model (leave cuda_graphs unset or false)")
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and self.family.supports_cuda_graphs and expert_shard is None
        elif cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got device {self.device}")
        self.cuda_graphs = bool(cuda_graphs)
        self.runner = ModelRunner(self.family, self.cache, self.device, self.max_model_len, max_num_seqs,
                                  cuda_graphs=self.cuda_graphs)
        self.stats = {"steps": 0, "draft_tokens": 0, "accepted_tokens": 0, "first_drafts": 0, "first_accepted": 0}
        stopper = StopChecker(self.eos_token_ids, self.tokenizer)
        lockstep = Lockstep(expert_shard)
        self.decoding = (SpeculativeDecoding(self.runner, stopper, self.vocab_size, self.stats, speculative_k, lockstep)
                         if speculative_k else PlainDecoding(self.runner, stopper, self.vocab_size, self.stats, lockstep))
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens,
                                   lookahead=self.decoding.lookahead)
        self._seeds = random.Random(seed)
        self._next_request = 0
        # held around each engine step (and while requests enter or leave the scheduler): a caller that replaces
        # the weights from another thread takes it too, so they change between steps, never inside one
        self.step_lock = threading.Lock()
        self.weights_version = 0  # the weights' policy version, as their owner counts them (weights_changed)

    # ------------------------------------------------------------------ public API
    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed MTP draft tokens since the engine was built (speculative_k > 0)."""
        return self.stats["accepted_tokens"] / max(1, self.stats["draft_tokens"])

    def generate(self, prompts: Seq[str] | Seq[Seq[int]] | str, params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; results in prompt order. use_tqdm (vLLM's name for it): show progress
        (a bar on a terminal, plain lines otherwise: r1pipe.tracking.progress)."""
        done = dict(pair for finished in self.iter_generate(prompts, params, use_tqdm) for pair in finished)
        return [done[i] for i in range(len(done))]

    def iter_generate(self, prompts: Seq[str] | Seq[Seq[int]] | str,
                      params: SamplingParams | Seq[SamplingParams] | None = None,
                      use_tqdm: bool = False) -> Iterator[list[tuple[int, RequestOutput]]]:
        """After each engine step that finished prompts, [(prompt index, output)] for them, while the
        others keep decoding: the same continuous batch as `generate`, so a caller can score finished
        prompts while generation goes on. Closing the iterator early frees everything in flight."""
        prompts, plist = pair_requests(prompts, params)
        groups = [self._make_group(p, sp) for p, sp in zip(prompts, plist)]
        with self.step_lock:
            for group in groups:
                group.weights_version = self.weights_version
                self.scheduler.add(group)
        index = {id(g): i for i, g in enumerate(groups)}
        pending = set(range(len(groups)))
        progress = StepProgress(len(groups), 0, "generate", unit="prompt", transient=True).start() if use_tqdm else None
        was_training = self.model.training
        self.model.eval()
        self.scheduler.take_retired()
        try:
            while self.scheduler.has_work():
                with self.step_lock, torch.inference_mode():
                    self._step()
                # only the groups of sequences that finished in this step can have finished
                touched = {id(s.group): s.group for s in self.scheduler.take_retired()}
                finished = sorted(index[k] for k, g in touched.items() if k in index and self._is_done(g))
                if not finished:
                    continue
                pending.difference_update(finished)
                if progress is not None:
                    progress.advance(n=len(finished))
                yield [(i, self._request_output(groups[i])) for i in finished]
            if pending:  # prompts that needed no decode step
                if progress is not None:
                    progress.advance(n=len(pending))
                yield [(i, self._request_output(groups[i])) for i in sorted(pending)]
        except BaseException:  # an error, or the caller closed the iterator: nothing stays allocated
            with self.step_lock:
                self._abort()
            raise
        finally:
            self.model.train(was_training)
            if progress is not None:
                progress.stop()

    @torch.no_grad()
    def update_weights(self, weights: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy new weights into the model in place (names as in its state dict); returns how many were set.
        FP8 weights (fp8=True) are quantized on the way in. An expert-parallel process skips the routed experts
        other ranks hold. Unknown names or wrong shapes are an error naming them; nothing is half-applied on
        error."""
        items = list(weights.items()) if isinstance(weights, dict) else list(weights)
        if self.experts_elsewhere:
            items = [(n, t) for n, t in items if n not in self.experts_elsewhere]
        own = self.model.state_dict(keep_vars=True)
        unknown = [n for n, _ in items if n not in own and not n.endswith(_SHARED_ALIASES)]
        if unknown:
            raise KeyError(f"update_weights: {len(unknown)} names not in the model, e.g. {unknown[:5]}")
        bad = [f"{n}: {tuple(t.shape)} vs {tuple(own[n].shape)}" for n, t in items
               if n in own and t.shape != own[n].shape]
        if bad:
            raise ValueError(f"update_weights: shape mismatch for {bad[:5]}")
        count = 0
        for name, tensor in items:
            if name in own:
                set_weight(own, name, tensor)
                count += 1
        return count

    def weights_changed(self) -> None:
        """Record that the caller has just replaced the weights, between engine steps (with `step_lock` held while
        it did, when another thread generates): `weights_version` counts one more, and every request in flight
        goes on under the new weights from where it is. A running or preempted sequence records the change at its
        output length (CompletionOutput.weight_changes): the tokens it sampled so far are the old weights', the
        rest the new ones'. A running sequence keeps its cache, which the old weights computed (as PipelineRL
        does); a preempted one recomputes it with the new weights when it resumes. A prompt not yet admitted
        records it at 0."""
        self.weights_version += 1
        for group in chain(self.scheduler.waiting, self.scheduler.prefilling):
            group.weight_changes.append(0)
        for seq in chain(self.scheduler.running, self.scheduler.preempted):
            if not seq.finished:
                seq.weight_changes.append(len(seq.output_ids))

    # ------------------------------------------------------------------ requests
    def _make_group(self, prompt: str | Seq[int], params: SamplingParams) -> SequenceGroup:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer; pass tokenizer= or token-id prompts")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if params.return_routing and self.family.facts.model_type != V3:
            raise ValueError(f"return_routing: expert routing is recorded for r1pipe's DeepSeek-V3; this is a "
                             f"{self.family.facts.model_type} model without experts")
        if len(ids) + params.max_tokens + self.speculative_k > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)}) + max_tokens ({params.max_tokens}) exceeds max_model_len "
                             f"{self.max_model_len}")
        if params.seed is not None:
            seeds = [(params.seed * 1_000_003 + i) & 0x7FFF_FFFF_FFFF_FFFF for i in range(params.n)]
        else:
            seeds = [self._seeds.getrandbits(63) for _ in range(params.n)]
        group = SequenceGroup(self._next_request, text, ids, params, seeds)
        self._next_request += 1
        return group

    @staticmethod
    def _is_done(group: SequenceGroup) -> bool:
        return bool(group.seqs) and all(s.finished and not s.awaiting_final_feed for s in group.seqs)

    def _abort(self) -> None:
        """Leave the engine usable after an error: free everything, drop queued work."""
        self.scheduler.abort()

    # ------------------------------------------------------------------ engine step
    def _step(self) -> None:
        self.stats["steps"] += 1
        groups, resumed = self.scheduler.admit()
        if groups or resumed:
            self._prefill(groups, resumed)
        self.scheduler.grow()
        if not self.scheduler.running:
            if self.scheduler.has_work() and not (groups or resumed):
                raise RuntimeError("scheduler stalled: no running sequences and nothing admissible")
            return
        self.scheduler.retire(self.decoding.step(self.scheduler.running))

    def _prefill(self, groups: list[SequenceGroup], resumed: list[Sequence]) -> None:
        """One padded forward over the admitted prompts and the preempted sequences' tokens (all but the
        newest, which the next step feeds); then each prompt's n samples draw their first token."""
        rows = [g.prompt_ids for g in groups] + [[s.token_at(p) for p in range(s.length - 1)] for s in resumed]
        batch = Batch.prefill(rows, [g.prompt_blocks for g in groups] + [s.blocks for s in resumed])
        want_routing = any(g.params.return_routing for g in groups)
        lens = [len(r) for r in rows]
        out = self.runner.forward(batch, want_routing, last=torch.tensor(lens) - 1)  # logits [rows, 1, V]
        G = len(groups)
        for s in resumed:
            s.num_cached = s.length - 1
        if want_routing:
            routing = torch.stack(out.routing)[:, :G].cpu()  # [layers, G, S, k]
            for i, g in enumerate(groups):
                if g.params.return_routing:
                    g.prompt_routing = routing[:, i, : g.prompt_len].clone()
        self.decoding.after_prefill(batch, out, lens)
        forked = [(i, seq) for i, g in enumerate(groups) for seq in self.scheduler.fork(g)]
        self.decoding.attach(out, lens, forked + list(enumerate(resumed, start=G)))
        if not forked:
            return
        logits = out.logits[torch.tensor([i for i, _ in forked], device=self.device), 0]  # [n samples, V]
        seqs = [seq for _, seq in forked]
        self.decoding.sample_and_append(seqs, logits)
        self.scheduler.retire([s for s in seqs if s.finished and not s.awaiting_final_feed])

    # ------------------------------------------------------------------ results
    def _request_output(self, group: SequenceGroup) -> RequestOutput:
        outs = []
        for seq in group.seqs:
            text = ""
            if self.tokenizer is not None:
                text = self.tokenizer.decode(seq.output_ids, seq.params.skip_special_tokens)
                if isinstance(seq.stop_reason, str):
                    found = [(text.find(s), -len(s)) for s in seq.params.stop or [] if s in text]
                    if found:  # the first stop string (the longest of those starting there)
                        at, minus_len = min(found)
                        text = text[: at - minus_len if seq.params.include_stop_str_in_output else at]
            routing = None
            if seq.params.return_routing:
                k = self.family.facts.num_experts_per_tok
                routing = (torch.stack(seq.routing, dim=1) if seq.routing
                           else torch.zeros(self.num_moe_layers, 0, k, dtype=torch.long))
            outs.append(CompletionOutput(index=seq.index, text=text, token_ids=list(seq.output_ids),
                                         logprobs=list(seq.logprobs) if seq.params.logprobs else None,
                                         finish_reason=seq.finish_reason or "length", routing=routing,
                                         stop_reason=seq.stop_reason, weight_changes=list(seq.weight_changes)))
        return RequestOutput(request_id=group.request_id, prompt=group.prompt, prompt_token_ids=list(group.prompt_ids),
                             outputs=outs, prompt_routing=group.prompt_routing, weights_version=group.weights_version)
