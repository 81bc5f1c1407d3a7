"""LLMEngine: the synchronous core. add_request / step / abort, one model forward per step."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from girandole.engine.cpu_threads import CpuThreads, thread_invariant
from girandole.engine.heap import release_free_heap
from girandole.engine.images import PromptImage, SeqImage, place_images
from girandole.engine.kv_cache import KVCacheManager
from girandole.engine.lora_manager import LoRAManager
from girandole.engine.outputs import RequestOutput
from girandole.engine.pooling import PoolingParams
from girandole.engine.postprocess import Postprocessor, request_output
from girandole.engine.runner import LaunchedStep, ModelRunner
from girandole.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from girandole.engine.sequence import Sequence
from girandole.engine.speculation import DraftModel, SpeculationConfig, Speculator
from girandole.engine.step_budget import StepBudget
from girandole.env_switches import env_switch, env_threads, threads_setting
from girandole.sampling.gpu_sampler import GpuSampler, needs_host
from girandole.sampling.grammar import GrammarCache, SequenceGrammar
from girandole.sampling.params import SamplingParams
from girandole.sampling.sampler import Sampler

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    model: str | None = None  # a .gguf file or HF folder; None = the default Gemma 3 270M
    mode: str = "fast"  # "fast" (quantized linears on CPU) or "reference" (float32)
    device: str | None = None  # None: cuda if available, else cpu
    kv_cache_gb: float = 1.0
    # The KV cache's element type: "auto" (bf16 on GPU; float16 on CPU in fast mode with the
    # native kernels, else float32), or "float32" / "float16" on CPU (engine/kv_groups.py)
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's context, capped by the KV cache size
    seed: int | None = None  # seed of the generator that unseeded requests draw from
    # While decodes run, a step's prompt tokens are capped so it takes about this long (the
    # streams' inter-token latency); None: the token budget alone (engine/step_budget.py)
    target_itl_ms: float | None = 100.0
    # Speculative decoding for every request (girandole.engine.speculation): n-gram lookup
    # proposing this many tokens, or a draft model with the same tokenizer.
    ngram_speculation_length: int = 0
    draft_model: str | None = None
    draft_token_count: int = 4
    max_loras: int = 8  # LoRA adapters resident at once (any number may be loaded)
    merge_lora: str | None = None  # a PEFT adapter folder merged into the weights at load
    # The GPU path (Triton paged attention, GpuSampler): None = on for CUDA. True on CPU runs
    # it there too (tests and benchmarks/gpu_check.py --smoke, under TRITON_INTERPRET=1).
    gpu_path: bool | None = None
    # The GPU path's decode steps run as CUDA graphs captured at start-up; True: always eager.
    enforce_eager: bool = False
    # Sliding-window layers keep only their window's KV blocks (engine/kv_groups.py).
    sliding_window_cache: bool = True
    # Overlap scheduling on the GPU path: the host schedules and prepares step N+1 while step
    # N runs on the device (`LLMEngine.step`). None: on for the GPU path on CUDA; True runs it
    # on CPU too (the tests); never without the GPU path or with engine-wide speculation.
    overlap_scheduling: bool | None = None
    # Threads on a CPU: a fixed count, or None for GIRANDOLE_THREADS, else "auto": as many as
    # torch's default that other processes leave cores for (engine/cpu_threads.py)
    threads: int | None = None
    # Prompt rows on the linears' int8 kernel too, as decode rows (CPUs without AMX): prefill
    # ~1.2x faster, prompt tokens (prompt logprobs, echo, embeddings) at the decode rows'
    # accuracy. None: GIRANDOLE_INT8_PROMPTS, default off.
    int8_prompts: bool | None = None


def int8_prompts_moot(device: torch.device, mode: str) -> str | None:
    """Why EngineConfig.int8_prompts changes nothing here (one kernel takes every row), or
    None where it applies: fast mode on a CPU whose linears have an int8 kernel beside the
    bf16 one (the VNNI layout: no AMX)."""
    from girandole.model.kernels import wq_gemm

    if device.type != "cpu":
        return "a GPU"
    if mode != "fast":
        return "reference mode"
    if not wq_gemm.vnni_default():
        return "AMX, GIRANDOLE_VNNI=0 or no native kernels"
    return None


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
        self.cpu_threads: CpuThreads | None = None
        if device.type == "cpu":
            fixed = env_threads() if config.threads is None else threads_setting(config.threads)
            self.cpu_threads = CpuThreads(fixed)
        self.int8_prompts = (
            env_switch("INT8_PROMPTS", default=False)
            if config.int8_prompts is None
            else config.int8_prompts
        )
        self.tokenizer = load_tokenizer(path)
        self.model, self.model_config = load_model(
            path, mode=config.mode, device=device, merge_adapter=config.merge_lora
        )
        moot = int8_prompts_moot(device, config.mode) if self.int8_prompts else None
        if moot is not None:
            logger.warning(
                "int8_prompts changes nothing here: one kernel takes every row (%s)", moot
            )
        if self.cpu_threads is not None and not thread_invariant(self.model):
            self.cpu_threads.hold()
        self.loras = LoRAManager(self.model, device, config.max_loras)
        self.eos_token_ids = set(self.model_config.eos_token_ids) | set(
            self.tokenizer.stop_token_ids
        )
        gpu_path = device.type == "cuda" if config.gpu_path is None else config.gpu_path
        sampler_cls = GpuSampler if gpu_path else Sampler
        self.runner = ModelRunner(
            self.model,
            self.model_config,
            device,
            config.block_size,
            int(config.kv_cache_gb * (1 << 30)),
            sampler_cls(config.seed),
            tuple(sorted(self.eos_token_ids)),
            gpu_path,
            0 if config.enforce_eager else config.max_num_seqs,
            config.sliding_window_cache,
            config.mode,
            config.kv_cache_dtype,
            self.int8_prompts,
        )
        self.kv_cache = KVCacheManager(
            self.runner.num_blocks, config.block_size, self.runner.kv_windows
        )
        step_tokens = max(config.max_num_batched_tokens, config.max_num_seqs)
        capacity = self.kv_cache.max_tokens(step_tokens)
        self.max_model_len = min(
            self.model_config.max_position, config.max_model_len or capacity, capacity
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=step_tokens,
                max_model_len=self.max_model_len,
            ),
            self.kv_cache,
        )
        self.speculator = self._speculator(config, device)
        self.scheduler.admit = self.loras.admit
        self.grammars = GrammarCache(self.tokenizer, self.model_config.vocab_size)
        self.seqs: dict[str, Sequence] = {}
        self.postprocess = Postprocessor(
            self.scheduler, self.seqs, self.eos_token_ids, self.max_model_len
        )
        self._finished_early: list[RequestOutput] = []
        target = config.target_itl_ms
        self.step_budget = StepBudget(target / 1000 if target else None)
        wanted = config.overlap_scheduling
        if wanted is None:
            wanted = self.runner.gpu_path and device.type == "cuda"
        # On the CPU path the forward is synchronous and uses every core: nothing to overlap.
        self.overlap = bool(wanted and self.runner.gpu_path and not self.speculator.enabled_for_all)
        self._inflight: LaunchedStep | None = None  # the step on the device (overlap)
        self.num_overlapped_steps = 0  # steps launched while the previous one was in flight
        release_free_heap()  # the load's transient allocations (engine/heap.py)

    def _speculator(self, config: EngineConfig, device: torch.device) -> Speculator:
        if config.ngram_speculation_length < 0 or config.draft_token_count < 1:
            raise ValueError("ngram_speculation_length must be >= 0, draft_token_count >= 1")
        if config.ngram_speculation_length and config.draft_model:
            raise ValueError("n-gram speculation and a draft model are mutually exclusive")
        draft = None
        if config.draft_model:
            from girandole.model.default import resolve_model_path

            draft = DraftModel.load(
                resolve_model_path(config.draft_model),
                config.mode,
                device,
                config.block_size,
                int(config.kv_cache_gb * (1 << 30)),
                self.model_config.vocab_size,
                # CPU graphs for the draft's decode steps; a GPU draft stays eager
                0 if config.enforce_eager or device.type != "cpu" else config.max_num_seqs,
                config.kv_cache_dtype,
                self.int8_prompts,
            )
        spec = SpeculationConfig(
            ngram_length=config.ngram_speculation_length,
            draft_model=config.draft_model,
            draft_token_count=config.draft_token_count,
        )
        return Speculator(spec, self.max_model_len, draft)

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
        for t in params.logit_bias:  # the sampler would skip a bias on no token: say so
            if not 0 <= t < vocab:
                raise ValueError(f"logit_bias token id {t} is out of range [0, {vocab})")
        for t in params.speculation or []:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"speculation token id {t!r} is out of range [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"The prompt is too long: {len(prompt_token_ids)}, model maximum context length: "
                f"{self.max_model_len}"
            )

    def check_images(
        self, prompt_token_ids: list[int], images: list[PromptImage] | None
    ) -> list[SeqImage]:
        """A request's images placed at the prompt's image tokens; ValueError naming the
        problem (a text-only model, placeholders that do not pair up); safe to call from any
        thread. The GPU path takes them too: its prefill kernel lets an image's tokens attend
        to each other both ways."""
        if not images:
            return []
        if self.model_config.vision is None:
            raise ValueError("images are not supported: this model takes text only")
        placed = place_images(prompt_token_ids, images, self.model_config.vision)
        budget = self.scheduler.config.max_num_batched_tokens
        if placed and placed[0].end - placed[0].start > budget:
            raise ValueError(
                f"an image is {placed[0].end - placed[0].start} tokens, more than a step's token "
                f"budget ({budget}, --max-num-batched-tokens), and cannot be computed in one step"
            )
        return placed

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        images: list[PromptImage] | None = None,
        cache_salt: str | None = None,
        prefix_cache_max_len: int | None = None,
        compiled_grammar=None,
        pooling: PoolingParams | None = None,
        prompt_logprobs_last: int | None = None,
        priority: int = 0,
        adapter: str | None = None,
    ) -> None:
        """Queue a request. `compiled_grammar`: params.grammar compiled ahead (off this thread);
        compiled here if not given. With `pooling`, a prefill-only request that reports its
        prompt's pooled hidden state (girandole.engine.pooling). `prompt_logprobs_last`: score
        only the prompt's last N tokens (the others' prompt logprobs are None). `priority`: its
        scheduling tier (1: service_tier "priority", -1: a batch-job line). `adapter`: the name
        of a loaded LoRA adapter to run. `images`: a vision model's images, one for each run of
        image tokens in the prompt (engine/images.py)."""
        from girandole.tokenizer import IncrementalDetokenizer, StopStringMatcher

        if request_id in self.seqs:
            raise ValueError(f"request id already in use: {request_id}")
        self.check_request(prompt_token_ids, params)
        placed = self.check_images(prompt_token_ids, images)
        if pooling is not None:
            pooling.validate(params.max_tokens)
        if pooling is not None or (
            params.prompt_logprobs is not None and prompt_logprobs_last is None
        ):
            # Cached prompt positions have no hidden states to score or pool: compute them all.
            prefix_cache_max_len = 0
        elif params.prompt_logprobs is not None:
            # Only the last N tokens are scored, each by the position before it: the positions
            # before those may come from the cache.
            limit = max(0, len(prompt_token_ids) - prompt_logprobs_last - 1)
            if prefix_cache_max_len is None or prefix_cache_max_len > limit:
                prefix_cache_max_len = limit
        lora = self.loras.get(adapter) if adapter is not None else None
        seq = Sequence(
            request_id,
            prompt_token_ids,
            params,
            cache_salt,
            prefix_cache_max_len,
            priority=priority,
            lora=lora,
        )
        seq.pooling = pooling
        seq.images = placed
        if seq.prompt_logprobs is not None and prompt_logprobs_last is not None:
            # the runner scores from the first position not yet in the list
            seq.prompt_logprobs = [None] * max(1, len(prompt_token_ids) - prompt_logprobs_last)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids)
        if params.stop:
            seq.stop_matcher = StopStringMatcher(params.stop)
        if params.grammar is not None:
            compiled = compiled_grammar or self.grammars.compile(params.grammar)
            seq.grammar = SequenceGrammar(compiled, params.grammar)
        self.speculator.start(seq)
        self.seqs[request_id] = seq
        if params.max_tokens == 0 and params.prompt_logprobs is None and pooling is None:
            # nothing to compute
            self.postprocess.mark_finished(seq, "length")
            self._finished_early.append(request_output(seq, [], ""))
            return
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None or seq.is_finished:
            return None
        self._drop_pending(seq)  # its in-flight token is never emitted
        out = self.postprocess.abort(seq)
        self.speculator.release(seq)
        return out

    def pause(self, request_id: str) -> None:
        """Stop stepping a request whose client has not read its outputs (AsyncEngine's
        backpressure); its blocks go to whoever needs them first. Unknown ids are ignored."""
        seq = self.seqs.get(request_id)
        if seq is not None:
            self.scheduler.pause(seq)

    def resume(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is not None:
            self.scheduler.resume(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self._finished_early) or self._inflight is not None

    # -- stepping ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One engine step: schedule -> run -> postprocess. With overlap scheduling, schedule
        and launch step N+1 while step N is on the device, then postprocess step N."""
        if self.cpu_threads is not None:
            self.cpu_threads.update()
        outputs = self._overlapped_step() if self.overlap else self._step()
        if self.cpu_threads is not None and not self.has_unfinished_requests():
            self.cpu_threads.idle()  # its next window starts with the next work
        return outputs

    def _step(self) -> list[RequestOutput]:
        outputs, self._finished_early = self._finished_early, []
        self.speculator.propose(self.scheduler.running)
        batch = self.scheduler.schedule(self.step_budget.prefill_cap)
        self.speculator.catch_up_drafts(batch, self._draft_budget(batch))
        for seq in batch.out_of_blocks:
            outputs.append(self.postprocess.finish(seq, "length", []))
        if not batch.seqs:
            return outputs
        outputs.extend(self._run_whole(batch))
        return outputs

    def _draft_budget(self, batch: ScheduledBatch) -> int:
        """The tokens a draft model may compute in this step to catch up its copies: what the
        step's budget leaves after the target's tokens, the draft's counted as the target's
        (a draft is rarely larger): the scheduler's token budget and, while decodes run, the
        step-time cap on prompt tokens (engine/step_budget.py). A long prompt's draft prefill
        is then chunked as the target's own is, and never makes a step longer than a step of
        the target alone may be."""
        if self.speculator.draft is None:
            return 0
        decode_rows, prefill = _step_shape(batch)
        budget = self.scheduler.config.max_num_batched_tokens - sum(batch.num_new_tokens)
        cap = self.step_budget.prefill_cap(decode_rows)
        return budget if cap is None else min(budget, cap - prefill)

    def _run_whole(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """Run `batch` and postprocess it before returning: the synchronous step's body."""
        now = self._started(batch)
        results = self.runner.run(batch)
        self._observe(batch, now)
        self.scheduler.mark_computed(batch)
        self.speculator.record(batch, results)
        outputs = self.postprocess(batch, results)
        self.speculator.settle(batch, self.kv_cache)
        return outputs

    def _started(self, batch: ScheduledBatch) -> float:
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        return now

    def _observe(self, batch: ScheduledBatch, start: float) -> None:
        self.step_budget.observe(*_step_shape(batch), time.monotonic() - start)

    # -- overlap scheduling --------------------------------------------------------------------
    #
    # Step N's sampled ids stay on the device; each sequence that sampled gets a placeholder
    # token (`Sequence.num_pending_tokens`), so the scheduler sees its real length and
    # allocates the slot, and step N+1's forward takes the real id by a gather from step N's
    # ids (ModelRunner.launch with StepInputs). Step N is postprocessed after step N+1 is
    # launched: the placeholder makes way for the real token, which may end the sequence; its
    # step N+1 result is then dropped (never emitted nor counted) and its blocks freed as
    # usual. Count-based ends are known at launch (`ends_pending`): such rows are not
    # scheduled again. A sequence whose next step needs step N's token on the host (a grammar,
    # proposals, a host-side sampler) makes the engine finish step N first: that step runs as
    # the synchronous one does. Penalties count step N's token on the device (GpuSampler's
    # LastTokens); a step that takes Sampler's host path anyway waits for those tokens there.

    def _overlapped_step(self) -> list[RequestOutput]:
        outputs, self._finished_early = self._finished_early, []
        prev, self._inflight = self._inflight, None
        if prev is not None and not self._may_overlap(prev):
            outputs.extend(self._complete(prev))
            prev = None
        self.speculator.propose(self.scheduler.running)
        batch = self.scheduler.schedule(self.step_budget.prefill_cap)
        self.speculator.catch_up_drafts(batch, self._draft_budget(batch))
        late: list[Sequence] = []  # out of blocks with a token in flight: ends after it
        for seq in batch.out_of_blocks:
            if seq.num_pending_tokens:
                late.append(seq)
            else:
                outputs.append(self.postprocess.finish(seq, "length", []))
        step = None
        if batch.seqs:
            if any(s.spec_token_ids for s in batch.seqs):
                # proposals are verified at once and settled after postprocessing: this step
                # runs synchronously (no sequence with a token in flight speculates)
                if prev is not None:
                    outputs.extend(self._complete(prev))
                    prev = None
                for seq in late:
                    if not seq.is_finished:
                        outputs.append(self.postprocess.finish(seq, "length", []))
                outputs.extend(self._run_whole(batch))
                return outputs
            now = self._started(batch)
            inputs = prev.inputs() if prev is not None else None
            shape = _step_shape(batch)  # before the step's tokens count as computed
            step = self.runner.launch(batch, inputs)
            step.start_time, step.shape = now, shape
            if prev is not None:
                self.num_overlapped_steps += 1
        if prev is not None:
            outputs.extend(self._complete(prev))
        for seq in late:
            if not seq.is_finished:
                outputs.append(self.postprocess.finish(seq, "length", []))
        if step is not None:
            self._launched(step)
            self._inflight = step
        return outputs

    def _launched(self, step: LaunchedStep) -> None:
        """After step N-1's postprocessing (its real tokens are in place): count step N's
        tokens computed (the prefix cache hashes them) and give every row that sampled a
        placeholder for its token in flight."""
        batch = step.batch
        live = ScheduledBatch(
            [s for s in batch.seqs if not s.is_finished],
            [n for s, n in zip(batch.seqs, batch.num_new_tokens) if not s.is_finished],
        )
        self.scheduler.mark_computed(live)
        for i in step.sampling:
            seq = batch.seqs[i]
            if seq.is_finished:
                continue
            seq.token_ids.append(0)  # the placeholder: never read by a forward
            seq.num_pending_tokens += 1
            if seq.num_output_tokens >= seq.params.max_tokens or len(seq) >= self.max_model_len:
                seq.ends_pending = True

    def _drop_pending(self, seq: Sequence) -> None:
        if seq.num_pending_tokens:
            del seq.token_ids[-seq.num_pending_tokens :]
            seq.num_pending_tokens = 0
        seq.ends_pending = False

    def _complete(self, step: LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's sampled ids and postprocess it."""
        results = step.results(self.runner.sampler)
        # the time from launch to results: about the device's time for the step
        self.step_budget.observe(*step.shape, time.monotonic() - step.start_time)
        for i in step.sampling:
            self._drop_pending(step.batch.seqs[i])  # the real token takes its place
        outputs = self.postprocess(step.batch, results)
        self.speculator.settle(step.batch, self.kv_cache)
        return outputs

    def _may_overlap(self, prev: LaunchedStep) -> bool:
        """Whether the next step may be scheduled before `prev` is postprocessed: no sequence
        with a token in flight needs it on the host to sample its next one, and none
        speculates (its proposals continue from that token)."""
        for i in prev.sampling:
            seq = prev.batch.seqs[i]
            if not seq.is_finished and _needs_host_tokens(seq):
                return False
        return not any(s.speculation is not None for s in self.scheduler.running)

    # -- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        kv = self.kv_cache
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": self.scheduler.num_waiting,
            "kv_blocks_total": kv.num_usable_blocks,
            "kv_blocks_used": kv.num_used_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_paused": self.scheduler.num_paused,  # clients behind on reading
            "num_batch_yields": self.scheduler.num_batch_yields,
            "prefix_cache_queries": kv.num_prefix_queries,
            "prefix_cache_hits": kv.num_prefix_hits,
            "lora_adapters": len(self.loras.registered),  # registered, resident or not
            "num_overlapped_steps": self.num_overlapped_steps,
            "max_num_seqs": self.config.max_num_seqs,
            "num_steps": self.step_budget.num_steps,  # and their seconds: mean step time
            "step_seconds": self.step_budget.seconds,
            **(self.cpu_threads.stats() if self.cpu_threads is not None else {}),
        }


def _step_shape(batch: ScheduledBatch) -> tuple[int, int]:
    """A scheduled step's decode rows and prompt tokens."""
    decode_rows = sum(s.is_decode(n) for s, n in zip(batch.seqs, batch.num_new_tokens))
    return decode_rows, sum(batch.num_new_tokens) - decode_rows


def _needs_host_tokens(seq: Sequence) -> bool:
    """Whether sampling the sequence's next token reads its previous one on the host."""
    return needs_host(seq.params, seq.grammar) or seq.speculation is not None
