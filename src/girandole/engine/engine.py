"""LLMEngine: the synchronous core. add_request / step / abort, one model forward per step."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from girandole.engine.kv_cache import KVCacheManager
from girandole.engine.lora_manager import LoRAManager
from girandole.engine.outputs import RequestOutput
from girandole.engine.postprocess import Postprocessor, request_output
from girandole.engine.runner import ModelRunner
from girandole.engine.scheduler import Scheduler, SchedulerConfig
from girandole.engine.sequence import Sequence
from girandole.sampling.grammar import GrammarCache, SequenceGrammar
from girandole.sampling.params import SamplingParams
from girandole.sampling.sampler import Sampler


@dataclass
class EngineConfig:
    model: str | None = None  # a .gguf file or HF folder; None = the default Gemma 3 270M
    mode: str = "fast"  # "fast" (quantized linears on CPU) or "reference" (float32)
    device: str | None = None  # None: cuda if available, else cpu
    kv_cache_gb: float = 1.0
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's context, capped by the KV cache size
    seed: int | None = None  # seed of the generator that unseeded requests draw from
    max_loras: int = 8  # LoRA adapters resident at once (any number may be loaded)
    merge_lora: str | None = None  # a PEFT adapter folder merged into the weights at load


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        from girandole.model.default import resolve_model_path
        from girandole.model.loader import load_model
        from girandole.tokenizer import load_tokenizer

        self.config = config = config or EngineConfig()
        path = resolve_model_path(config.model)
        self.model_path = path
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = device
        self.tokenizer = load_tokenizer(path)
        self.model, self.model_config = load_model(
            path, mode=config.mode, device=device, merge_adapter=config.merge_lora
        )
        self.loras = LoRAManager(self.model, device, config.max_loras)
        self.eos_token_ids = set(self.model_config.eos_token_ids) | set(
            self.tokenizer.stop_token_ids
        )
        self.runner = ModelRunner(
            self.model,
            self.model_config,
            device,
            config.block_size,
            int(config.kv_cache_gb * (1 << 30)),
            Sampler(config.seed),
            tuple(sorted(self.eos_token_ids)),
        )
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.block_size)
        capacity = self.runner.num_blocks * config.block_size
        self.max_model_len = min(
            self.model_config.max_position, config.max_model_len or capacity, capacity
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=max(config.max_num_batched_tokens, config.max_num_seqs),
                max_model_len=self.max_model_len,
            ),
            self.kv_cache,
        )
        self.scheduler.admit = self.loras.admit
        self.grammars = GrammarCache(self.tokenizer, self.model_config.vocab_size)
        self.seqs: dict[str, Sequence] = {}
        self.postprocess = Postprocessor(
            self.scheduler, self.seqs, self.eos_token_ids, self.max_model_len
        )
        self._finished_early: list[RequestOutput] = []

    # -- requests ----------------------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the problem; safe to call from any thread."""
        params.validate()
        if not prompt_token_ids:
            raise ValueError("prompt is empty: at least one token is required")
        vocab = self.model_config.vocab_size
        for t in prompt_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} is out of range [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"The prompt is too long: {len(prompt_token_ids)}, model maximum context length: "
                f"{self.max_model_len}"
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
        prefix_cache_max_len: int | None = None,
        compiled_grammar=None,
        adapter: str | None = None,
    ) -> None:
        """Queue a request. `compiled_grammar`: params.grammar compiled ahead (off this thread);
        compiled here if not given. `adapter`: the name of a loaded LoRA adapter to run."""
        from girandole.tokenizer import IncrementalDetokenizer, StopStringMatcher

        if request_id in self.seqs:
            raise ValueError(f"request id already in use: {request_id}")
        self.check_request(prompt_token_ids, params)
        if params.prompt_logprobs is not None:
            # Cached prompt positions have no logits to score: recompute the whole prompt.
            prefix_cache_max_len = 0
        lora = self.loras.get(adapter) if adapter is not None else None
        seq = Sequence(request_id, prompt_token_ids, params, cache_salt, prefix_cache_max_len, lora)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids)
        if params.stop:
            seq.stop_matcher = StopStringMatcher(params.stop)
        if params.grammar is not None:
            compiled = compiled_grammar or self.grammars.compile(params.grammar)
            seq.grammar = SequenceGrammar(compiled, params.grammar)
        self.seqs[request_id] = seq
        if params.max_tokens == 0 and params.prompt_logprobs is None:  # nothing to compute
            self.postprocess.mark_finished(seq, "length")
            self._finished_early.append(request_output(seq, [], ""))
            return
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None or seq.is_finished:
            return None
        return self.postprocess.abort(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self._finished_early)

    # -- stepping ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One engine step: schedule -> run -> postprocess."""
        outputs, self._finished_early = self._finished_early, []
        batch = self.scheduler.schedule()
        for seq in batch.out_of_blocks:
            outputs.append(self.postprocess.finish(seq, "length", []))
        if not batch.seqs:
            return outputs
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        results = self.runner.run(batch)
        self.scheduler.mark_computed(batch)
        outputs.extend(self.postprocess(batch, results))
        return outputs

    # -- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        kv = self.kv_cache
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": self.scheduler.num_waiting,
            "kv_blocks_total": kv.num_blocks,
            "kv_blocks_used": kv.num_used_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": kv.num_prefix_queries,
            "prefix_cache_hits": kv.num_prefix_hits,
        }
