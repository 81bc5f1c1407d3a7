"""ModelRunner: owns the model, its KV cache and the sampler; runs a scheduled batch (one
forward, the logits it needs, prompt logprobs) and returns each sequence's sampled token."""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import nn

from girandole.engine import pooling
from girandole.engine.cpu_graphs import CpuDecodeGraphs
from girandole.engine.cuda_graphs import DecodeGraphs
from girandole.engine.images import image_batch
from girandole.engine.kv_groups import (
    bind_kv_cache,
    bytes_per_block,
    group_layers,
    kv_cache_dtype,
)
from girandole.engine.lora_manager import lora_batch
from girandole.engine.scheduler import ScheduledBatch
from girandole.engine.sequence import Sequence
from girandole.model import kernels
from girandole.model.attention import Attention
from girandole.model.config import ModelConfig
from girandole.model.context import (
    ContextSlots,
    ForwardContext,
    NativeSlots,
    PaddedDecode,
    PagedTables,
    forward_context,
    to_device,
)
from girandole.model.moe import stack_experts
from girandole.sampling.gpu_sampler import LastTokens, PendingSample
from girandole.sampling.rejection import verify
from girandole.sampling.sampler import Sampler, SampleResult, SamplerRow, top_logprobs

logger = logging.getLogger(__name__)


def _gpu_path(device: torch.device, wanted: bool | None) -> bool:
    """Whether a runner takes the GPU path: as `wanted`, or (None) on CUDA where triton imports."""
    if wanted is False or (wanted is None and device.type != "cuda"):
        return False  # the CPU path: triton is not even imported
    from girandole.model.kernels import triton_paged_attention

    if triton_paged_attention.available():
        return True
    if wanted:
        raise ValueError("the GPU path needs triton (pip install triton)")
    logger.warning("triton is not installed: attention runs without the paged kernels")
    return False


@dataclass
class StepInputs:
    """Input tokens that are still on the device (overlap scheduling): `rows[id(seq)]` is the
    index in `ids` of the token that seq's last position takes, sampled by the step before,
    whose host copy is still a placeholder in `seq.token_ids`."""

    ids: torch.Tensor
    rows: dict[int, int]


@dataclass
class LaunchedStep:
    """A step whose forward and sampling are enqueued (ModelRunner.launch): `sampling` lists
    the batch rows that sample, whose ids are `pending.ids` on the device."""

    batch: ScheduledBatch
    partial: list  # per batch row: a result known at launch (prompt-only rows: None)
    sampling: list[int]
    pending: PendingSample | None = None
    start_time: float = 0.0
    shape: tuple[int, int] = (0, 0)  # decode rows, prompt tokens (the step budget's view)

    def inputs(self) -> StepInputs | None:
        """What the next step's rows read from this step's sampled ids."""
        if self.pending is None:
            return None
        return StepInputs(
            self.pending.ids, {id(self.batch.seqs[i]): j for j, i in enumerate(self.sampling)}
        )

    def results(self, sampler) -> list[SampleResult | list[SampleResult] | Exception | None]:
        """Every row's result, as `ModelRunner.run` gives them (waits for the device)."""
        results = list(self.partial)
        if self.pending is not None:
            for i, result in zip(self.sampling, sampler.finish(self.pending)):
                results[i] = result
        return results


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        device: torch.device,
        block_size: int,
        kv_cache_bytes: int,
        sampler: Sampler | None = None,
        eos_token_ids: tuple[int, ...] = (),
        gpu_path: bool | None = None,
        decode_graphs_max_batch: int = 0,
        sliding_window_cache: bool = True,
        mode: str = "fast",
        kv_dtype_setting: str = "auto",
        int8_prompts: bool = False,
    ) -> None:
        """`decode_graphs_max_batch`: run decode steps as graphs: on the GPU path CUDA graphs
        for up to this many sequences (engine/cuda_graphs.py); on the CPU (any value > 0)
        recorded native kernel calls, decode and verify steps of up to cpu_graphs.MAX_ROWS rows
        (engine/cpu_graphs.py); 0: eager, as --enforce-eager.
        `sliding_window_cache`: sliding-window layers keep only their window's blocks
        (engine/kv_groups.py); off, every layer keeps every position. `mode` (the model's:
        "fast" or "reference") and `kv_dtype_setting` choose the cache's element type
        (kv_groups.kv_cache_dtype). `int8_prompts`: prompt rows take the linears' int8
        kernel too where there are two (CPUs without AMX; EngineConfig.int8_prompts)."""
        self.model = model
        self.int8_prompts = int8_prompts
        # The GPU path (Triton paged attention over block tables): on by default on CUDA where
        # triton imports; on CPU only when asked (the tests, under TRITON_INTERPRET).
        self.gpu_path = _gpu_path(device, gpu_path)
        self.config = config
        self.device = device
        self.block_size = block_size
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        # bf16 on GPU; on CPU float16 storage read in float32 where the native kernel reads
        # every layer (fast mode), else float32 (engine/kv_groups.py)
        self.kv_dtype = kv_cache_dtype(
            kv_dtype_setting, device, mode, self.attn_layers, self.gpu_path
        )
        self.kv_groups = group_layers(self.attn_layers, sliding_window_cache)
        self.kv_windows = [g.window for g in self.kv_groups]
        per_block = bytes_per_block(self.kv_groups, block_size, self.kv_dtype)
        reserved = 1 if any(w is not None for w in self.kv_windows) else 0  # the null block
        self.num_blocks = max(1 + reserved, kv_cache_bytes // per_block)
        # The GPU path runs mixture-of-experts layers in the fused Triton kernel, on their
        # experts' weights stacked here, once (model/moe.py). A layer left on the torch
        # dispatch (experts the kernel cannot take) brings its expert counts to the host,
        # which no CUDA graph captures: such a model decodes eagerly.
        moe_fused = not self.gpu_path or stack_experts(model)
        graphs = self.gpu_path and decode_graphs_max_batch > 0 and moe_fused
        bind_kv_cache(
            self.kv_groups,
            self.num_blocks,
            block_size,
            self.kv_dtype,
            device,
            # one block past the cache's: the padding rows' scratch slot
            extra_blocks=1 if graphs else 0,
        )
        self._block_offsets = torch.arange(block_size, dtype=torch.long)
        self.sampler = sampler or Sampler()
        self.eos_token_ids = eos_token_ids  # the sampler's min_tokens suppresses these
        self.graphs: DecodeGraphs | None = None
        self.cpu_graphs: CpuDecodeGraphs | None = None
        if decode_graphs_max_batch > 0 and not self.gpu_path and device.type == "cpu":
            # rows, not sequences: a verify step has several rows a sequence
            self.cpu_graphs = CpuDecodeGraphs.build(model, len(self.kv_groups))
        if graphs:
            self.graphs = DecodeGraphs(
                model,
                device,
                block_size,
                decode_graphs_max_batch,
                max_blocks_per_seq=min(self.num_blocks, -(-config.max_position // block_size)),
                scratch_slot=self.num_blocks * block_size,
                num_kv_groups=len(self.kv_groups),
            )
            self.graphs.capture()

    # -- a step: forward, logits, sampling ---------------------------------------------------

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, inputs: StepInputs | None = None
    ) -> list[SampleResult | list[SampleResult] | Exception | None]:
        """Compute `batch`: one forward, the prompt logprobs it asks for, and a token for every
        sequence whose prompt (or last token) is now complete. Returns per sequence its
        SampleResult (a list of them for a row that verified proposed tokens: the accepted ones
        and one more), the exception that sampling it raised, or None (nothing sampled).
        `inputs`: input tokens still on the device (overlap scheduling)."""
        results, sampling, hidden, sample_hidden = self._forward(batch, inputs)
        if sampling:
            seqs = [batch.seqs[i] for i in sampling]
            for i, result in zip(sampling, self._sample(seqs, hidden, sample_hidden)):
                results[i] = result
        return results

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, inputs: StepInputs | None = None) -> LaunchedStep:
        """`run` without waiting for the device (GpuSampler only): the forward and sampling are
        enqueued, the sampled ids stay on the device for the next step's inputs, and
        `LaunchedStep.results()` waits for them. A step that verifies proposals runs whole."""
        results, sampling, hidden, sample_hidden = self._forward(batch, inputs)
        step = LaunchedStep(batch, results, sampling)
        if not sampling:
            return step
        seqs = [batch.seqs[i] for i in sampling]
        states = [s.generator.get_state() if s.generator is not None else None for s in seqs]
        last = self._last_tokens(seqs, inputs)
        try:
            step.pending = self.sampler.launch(
                self.compute_logits(hidden.index_select(0, self._index(sample_hidden))),
                [self._sampler_row(s) for s in seqs],
                last,
            )
        except Exception:  # noqa: BLE001 - `_sample` finds the failing row
            logger.exception("launching the sampling of %d rows failed", len(seqs))
            for s, state in zip(seqs, states):  # the launch may have drawn their uniforms
                if state is not None:
                    s.generator.set_state(state)
            if last is not None:  # `_sample` reads the rows' last tokens on the host
                for k, token in zip(last.rows, last.ids.tolist()):
                    seqs[k].token_ids[-1] = token
            done = self._sample(seqs, hidden, sample_hidden)
            ids = [r.token_id if isinstance(r, SampleResult) else 0 for r in done]
            ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
            step.pending = PendingSample([], ids_t, results=done)
        return step

    def _last_tokens(self, seqs: list[Sequence], inputs: StepInputs | None) -> LastTokens | None:
        """Which sampling rows' last token is still on the device (in `inputs`), and those."""
        if inputs is None:
            return None
        at = [(k, inputs.rows[id(s)]) for k, s in enumerate(seqs) if id(s) in inputs.rows]
        if not at:
            return None
        source = self._index([j for _, j in at])
        return LastTokens([k for k, _ in at], inputs.ids.index_select(0, source))

    def _forward(self, batch: ScheduledBatch, inputs: StepInputs | None):
        """The forward of `batch`, prompt logprobs and pooling, and proposals verified: the
        results so far, which batch rows sample, the hidden states, and those rows' in them."""
        logit_rows = [self._logit_rows(s, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]
        hidden = self.execute(batch.seqs, batch.num_new_tokens, logit_rows, inputs)
        sampling: list[int] = []  # batch index of each sampling sequence
        sample_hidden: list[int] = []  # its row in `hidden`
        results: list[SampleResult | list[SampleResult] | Exception | None]
        results = [None] * len(batch.seqs)
        row = 0
        for i, (seq, n, rows) in enumerate(zip(batch.seqs, batch.num_new_tokens, logit_rows)):
            if seq.prompt_logprobs is not None and rows:
                self._collect_prompt_logprobs(seq, rows, hidden[row : row + len(rows)])
            if seq.pooling is not None:
                pooling.accumulate(
                    seq, seq.num_computed_tokens, self.model.norm(hidden[row : row + n])
                )
            row += len(rows)
            if self._samples(seq, n) and seq.spec_token_ids:
                results[i] = self._verify(seq, hidden[row - 1 - len(seq.spec_token_ids) : row])
            elif self._samples(seq, n):
                sampling.append(i)
                sample_hidden.append(row - 1)
        return results, sampling, hidden, sample_hidden

    @staticmethod
    def _samples(seq: Sequence, n: int) -> bool:
        """Whether this step's `n` new tokens of `seq` complete it (with the tokens it proposed),
        so that it samples a token."""
        end = len(seq) + len(seq.spec_token_ids)
        return seq.params.max_tokens > 0 and seq.num_computed_tokens + n == end

    @classmethod
    def _logit_rows(cls, seq: Sequence, n: int) -> list[int]:
        """Which of this step's new tokens of `seq` need logits."""
        if seq.pooling is not None:  # every new token's hidden state is pooled
            return list(range(n))
        start = seq.num_computed_tokens
        rows = []
        if seq.prompt_logprobs is not None:
            # Position p predicts prompt token p + 1; skip what a preempted run already has.
            first = max(start, len(seq.prompt_logprobs) - 1)
            rows = list(range(first - start, min(start + n, seq.num_prompt_tokens - 1) - start))
        if cls._samples(seq, n):
            # the last token's position, and one per proposed token before it
            for r in range(n - 1 - len(seq.spec_token_ids), n):
                if not rows or rows[-1] < r:
                    rows.append(r)
        return rows

    def _verify(self, seq: Sequence, hidden: torch.Tensor) -> list[SampleResult] | Exception:
        """The tokens a row that proposed tokens emits (girandole.sampling.rejection); hidden:
        its k + 1 positions' final hidden states."""
        proposal = seq.spec_token_ids
        rows = [
            SamplerRow(
                seq.params,
                seq.generator,
                seq.token_ids + proposal[:j],
                seq.num_prompt_tokens,
                self.eos_token_ids,
                seq.sampler_state,
            )
            for j in range(len(proposal) + 1)
        ]
        try:
            return verify(self.sampler, self.compute_logits(hidden), rows, proposal)
        except Exception as exc:  # noqa: BLE001 - reported on that request
            logger.exception("verifying %s's proposed tokens failed", seq.request_id)
            return exc

    def _index(self, rows: list[int]) -> torch.Tensor:
        return to_device(_longs(rows), self.device)

    def _sampler_row(self, seq: Sequence) -> SamplerRow:
        return SamplerRow(
            seq.params,
            seq.generator,
            seq.token_ids,
            seq.num_prompt_tokens,
            self.eos_token_ids,
            seq.sampler_state,
            seq.grammar,
        )

    def _sample(
        self, seqs: list[Sequence], hidden: torch.Tensor, sample_hidden: list[int]
    ) -> list[SampleResult | Exception]:
        """Sample every row at once; if that raises, each row alone, so that one request's
        failure (a grammar matcher that throws, say) ends that request only. The others get what
        they would have got: the sampler and the LM head are batch-invariant, and seeded
        generators are rewound first. Returns a SampleResult or the exception, per row."""
        rows = [self._sampler_row(s) for s in seqs]
        states = [r.generator.get_state() if r.generator is not None else None for r in rows]
        logits = self.compute_logits(hidden.index_select(0, self._index(sample_hidden)))
        try:
            return self.sampler(logits, rows)
        except Exception as exc:  # noqa: BLE001 - find the culprit below
            if len(rows) == 1:
                return [exc]
            logger.exception("sampling %d rows failed; sampling each alone", len(rows))
        results: list[SampleResult | Exception] = []
        for row, state, h in zip(rows, states, sample_hidden):
            if state is not None:
                row.generator.set_state(state)
            try:
                alone = self.compute_logits(hidden[h : h + 1])
                results.append(self.sampler(alone, [row])[0])
            except Exception as exc:  # noqa: BLE001 - reported on that request
                results.append(exc)
        return results

    _PROMPT_LOGITS_CHUNK = 32  # rows per LM-head call: a row of logits is 1 MiB for Gemma

    def _collect_prompt_logprobs(self, seq: Sequence, rows: list[int], hidden: torch.Tensor):
        """Append to seq.prompt_logprobs the logprobs of the prompt tokens that this step's
        `rows` (their hidden states) predict."""
        n_top = seq.params.prompt_logprobs
        start = seq.num_computed_tokens
        for c in range(0, len(rows), self._PROMPT_LOGITS_CHUNK):
            chunk = rows[c : c + self._PROMPT_LOGITS_CHUNK]
            positions = [start + r for r in chunk]
            keep = [i for i, p in enumerate(positions) if p + 1 < seq.num_prompt_tokens]
            if not keep:
                continue
            logits = self.compute_logits(
                hidden[c : c + len(chunk)][torch.tensor(keep)], batch_invariant=False
            )
            lp = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor(
                [seq.token_ids[positions[i] + 1] for i in keep], device=logits.device
            )
            chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
            tops = top_logprobs(lp, n_top)
            for p, t, v, top in zip((positions[i] for i in keep), targets.tolist(), chosen, tops):
                routing = seq.routing.get(p) if seq.routing is not None else None
                seq.prompt_logprobs.append(SampleResult(t, v, v, top, routing=routing))

    # -- the forward ---------------------------------------------------------------------------

    def _group_slots(
        self, seqs: list[Sequence], query_lens: list[int], context_lens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Every KV cache group's cache slots of the batch's blocks at once: [groups, B *
        block_size] long, each sequence's blocks 0..ceil(context_len / block_size)-1 in turn;
        the index there of each new token [T]; where each sequence starts there [S]. The small
        index lists in Python ints: a dozen torch calls on a few elements cost more."""
        bs = self.block_size
        nums = [-(-end // bs) for end in context_lens]
        flat_tables: list[int] = []
        for g in range(len(self.kv_groups)):
            for seq, n in zip(seqs, nums):
                flat_tables.extend(seq.block_tables[g][:n])
        tables = _longs(flat_tables).view(len(self.kv_groups), -1)
        slots = (tables[:, :, None] * bs + self._block_offsets).flatten(1)
        starts = list(accumulate((n * bs for n in nums[:-1]), initial=0))
        new: list[int] = []
        for start, end, q in zip(starts, context_lens, query_lens):
            new.extend(range(start + end - q, start + end))
        return slots, _longs(new), starts

    def prepare(
        self, seqs: list[Sequence], num_new_tokens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """Token ids [T], positions [T] and the forward's context for the new tokens of `seqs`
        (decode tokens first, as the scheduler orders them)."""
        input_ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        num_decode_rows = 0
        leading_decodes = True  # every sequence so far decodes
        for seq, n in zip(seqs, num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            if end > len(seq):  # proposed tokens, verified by this forward
                input_ids.extend(seq.spec_token_ids[: end - len(seq)])
            positions.extend(range(start, end))
            context_lens.append(end)
            if leading_decodes and seq.is_decode(n):
                num_decode_rows += n  # a decode token and the proposed tokens after it
            else:
                leading_decodes = False
        ids = to_device(_longs(input_ids), self.device)
        pos = to_device(_longs(positions), self.device)
        shared = dict(
            query_lens=list(num_new_tokens),
            context_lens=context_lens,
            num_decode_rows=num_decode_rows,
            int8_prompts=self.int8_prompts,
            lora=lora_batch(seqs, num_new_tokens, self.device),
        )
        flat, new, starts = self._group_slots(seqs, num_new_tokens, context_lens)
        native = not self.gpu_path and self.device.type == "cpu" and kernels.available()
        # the native kernel's view: where each row's sequence starts, and its keys
        native_rows = (
            (_longs([s for s, n in zip(starts, num_new_tokens) for _ in range(n)]), pos + 1)
            if native
            else None
        )
        num_groups = len(self.kv_groups)
        paged: list[PagedTables | None] = [None] * num_groups
        if self.gpu_path:  # the Triton kernels read each group's block tables
            paged = PagedTables.build_groups(
                [[s.block_tables[g] for s in seqs] for g in range(num_groups)],
                list(num_new_tokens),
                context_lens,
                self.block_size,
                self.device,
            )
        groups = [
            self._group_context(flat[g], new, native_rows, shared, paged[g])
            for g in range(num_groups)
        ]
        ctx = groups[0]
        if len(groups) > 1:
            ctx.groups = groups
        return ids, pos, ctx

    def _group_context(
        self,
        slots: torch.Tensor,
        new: torch.Tensor,
        native_rows: tuple[torch.Tensor, torch.Tensor] | None,
        shared: dict,
        paged: PagedTables | None,
    ) -> ForwardContext:
        """The forward's context for one KV cache group's layers: where they write and read.
        `slots`: its slots of every sequence's blocks, concatenated; `new`: the new tokens'
        indices in it; `native_rows`: where each new token's sequence starts in it and how
        many keys it sees (the native kernel's view, None without it); `paged`: its block
        tables on the GPU path."""
        context_slots = ContextSlots(
            slots,
            shared["context_lens"],
            self.block_size,
            # The GPU path's kernels read block tables: the per-sequence slots stay on the host.
            None if self.gpu_path else self.device,
        )
        ctx = ForwardContext(
            slot_mapping=to_device(slots.index_select(0, new), self.device),
            context_slots=context_slots,
            paged=paged,
            **shared,
        )
        if paged is not None:  # the GPU path: the Triton kernels read the block tables
            return ctx
        if native_rows is not None:
            ctx.native = NativeSlots(slots, *native_rows)
        elif self.device.type != "cpu" and all(n == 1 for n in ctx.query_lens):
            # The padded batched decode path is for GPUs; on CPU attention runs per sequence so
            # that each sequence's numbers do not depend on its batch neighbours.
            ctx.padded_decode = PaddedDecode.build(context_slots, self.device)
        return ctx

    @torch.inference_mode()
    def execute(
        self,
        seqs: list[Sequence],
        num_new_tokens: list[int],
        logit_rows: list[list[int]],
        inputs: StepInputs | None = None,
    ) -> torch.Tensor | None:
        """Run one forward over the new tokens of `seqs`.

        `logit_rows[i]` lists which of seq i's new tokens (0-based within this step's chunk)
        need logits. Returns their final hidden states [sum(len(rows)), hidden] in that order
        (None if no row is wanted); `compute_logits` turns them into logits. `inputs`: tokens
        still on the device, gathered into their rows here (overlap scheduling).
        """
        ids, pos, ctx = self.prepare(seqs, num_new_tokens)
        routing = self.config.num_moe_layers and any(s.routing is not None for s in seqs)
        if routing:
            ctx.routing = []  # each MoE layer's expert ids (model/moe.py)
        if inputs is not None:
            self._gather_inputs(ids, seqs, num_new_tokens, inputs)
        images = None
        if any(seq.images for seq in seqs):  # a vision model's prompt images (engine/images.py)
            images = image_batch(seqs, num_new_tokens, self.model.vision, self.device)
        if images is not None:
            with forward_context(ctx):
                hidden = self.model(ids, pos, images)
        elif self.graphs is not None and self.graphs.can_run(ctx):
            hidden = self.graphs.run(ids, pos, ctx)
        elif self.cpu_graphs is not None and self.cpu_graphs.can_run(ids, ctx):
            hidden = self.cpu_graphs.run(ids, pos, ctx)
        else:
            with forward_context(ctx):
                hidden = self.model(ids, pos)
        if routing:
            self._keep_routing(seqs, num_new_tokens, ctx.routing)

        rows: list[int] = []
        offset = 0
        for n, wanted in zip(num_new_tokens, logit_rows):
            rows.extend(offset + r for r in wanted)
            offset += n
        if not rows:
            return None
        return hidden.index_select(0, self._index(rows))

    @staticmethod
    def _keep_routing(
        seqs: list[Sequence], num_new_tokens: list[int], layers: list[torch.Tensor]
    ) -> None:
        """Each new token's expert ids (`layers`: [T, k] per MoE layer) into the routing of the
        sequences that asked for it, by position."""
        table = torch.stack(layers, dim=1).to("cpu", torch.int16).numpy()  # [T, layers, k]
        offset = 0
        for seq, n in zip(seqs, num_new_tokens):
            if seq.routing is not None:
                start = seq.num_computed_tokens
                for r in range(n):
                    seq.routing[start + r] = table[offset + r]
            offset += n

    def _gather_inputs(
        self, ids: torch.Tensor, seqs: list[Sequence], num_new_tokens: list[int], inputs: StepInputs
    ) -> None:
        """Put the previous step's sampled ids, on the device, where `ids` holds placeholders:
        each such sequence's last token (one gather, no host sync)."""
        dst: list[int] = []
        src: list[int] = []
        offset = 0
        for seq, n in zip(seqs, num_new_tokens):
            j = inputs.rows.get(id(seq))
            if j is not None:
                p = len(seq) - 1 - seq.num_computed_tokens  # the last token, in this chunk
                if 0 <= p < n:
                    dst.append(offset + p)
                    src.append(j)
            offset += n
        if dst:
            index = to_device(torch.tensor(dst, dtype=torch.long), self.device)
            source = to_device(torch.tensor(src, dtype=torch.long), self.device)
            ids[index] = inputs.ids.index_select(0, source)

    # Float LM heads' matmuls may round a row differently with the row count (oneDNN's fp32
    # matmul takes another path at 16 rows on an Intel AVX512 host, at 4 vs 8 on an AMD one):
    # sampling rows go through them in slices of exactly this many, the last one padded, so
    # every row takes the same path. Heads whose rows are exact at any count (`row_invariant`:
    # the CPU int8 head) take every row at once.
    SAMPLING_ROWS_PER_CALL = 8

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, batch_invariant: bool = True) -> torch.Tensor:
        """float32 logits [N, vocab] for hidden states [N, hidden], on the model's device."""
        step = self.SAMPLING_ROWS_PER_CALL
        whole = getattr(getattr(self.model, "lm_head", None), "row_invariant", False)
        if whole or not batch_invariant or self.device.type != "cpu":
            return self.model.compute_logits(hidden).float()
        n = hidden.shape[0]
        if n % step:
            hidden = torch.cat([hidden, hidden.new_zeros(step - n % step, hidden.shape[1])])
        return torch.cat(
            [
                self.model.compute_logits(hidden[i : i + step]).float()
                for i in range(0, hidden.shape[0], step)
            ]
        )[:n]


def _longs(values: list[int]) -> torch.Tensor:
    """A long tensor of `values` (array -> frombuffer: several times faster than torch.tensor
    on a list of ints)."""
    if not values:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(array("q", values), dtype=torch.long)
