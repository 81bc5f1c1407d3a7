"""ModelRunner: owns the model and its KV cache, turns a scheduled batch into one forward."""

from __future__ import annotations

import torch
from torch import nn

from girandole.engine.sequence import Sequence
from girandole.model import kernels
from girandole.model.attention import Attention, AttentionMetadata, attention_context
from girandole.model.config import ModelConfig


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        device: torch.device,
        block_size: int,
        kv_cache_bytes: int,
    ) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.block_size = block_size
        # fp32 attention on CPU (bf16 SDPA is ~10x slower there), bf16 on GPU.
        self.kv_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        per_token = sum(2 * a.num_kv_heads * a.head_dim for a in self.attn_layers)
        per_block = per_token * block_size * torch.tensor([], dtype=self.kv_dtype).element_size()
        self.num_blocks = max(1, kv_cache_bytes // per_block)
        num_slots = self.num_blocks * block_size
        for layer in self.attn_layers:
            shape = (num_slots, layer.num_kv_heads, layer.head_dim)
            # torch.zeros maps untouched pages lazily: memory grows only as the cache is used.
            layer.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=device)
            layer.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        self._block_offsets = torch.arange(block_size, dtype=torch.long)

    def _context_slots(self, seq: Sequence, context_len: int) -> torch.Tensor:
        table = torch.tensor(
            seq.block_table[: -(-context_len // self.block_size)], dtype=torch.long
        )
        return (table[:, None] * self.block_size + self._block_offsets).flatten()[:context_len]

    @torch.inference_mode()
    def execute(
        self, seqs: list[Sequence], num_new_tokens: list[int], logit_rows: list[list[int]]
    ) -> torch.Tensor | None:
        """Run one forward over the new tokens of `seqs`.

        `logit_rows[i]` lists which of seq i's new tokens (0-based within this step's chunk)
        need logits. Returns their final hidden states [sum(len(rows)), hidden] in that order
        (None if no row is wanted); `compute_logits` turns them into logits.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        context_slots: list[torch.Tensor] = []
        slot_mapping: list[torch.Tensor] = []
        for seq, n in zip(seqs, num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots = self._context_slots(seq, end)
            context_lens.append(end)
            context_slots.append(slots)
            slot_mapping.append(slots[start:end])

        # The padded batched decode path is for GPUs; on CPU attention runs per sequence so that
        # each sequence's numbers do not depend on its batch neighbours.
        decode_only = self.device.type != "cpu" and all(n == 1 for n in num_new_tokens)
        num_decode_rows = 0  # the engine orders decode tokens first
        for seq, n in zip(seqs, num_new_tokens):
            if not seq.is_decode(n):
                break
            num_decode_rows += 1
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            num_decode_rows=num_decode_rows,
            slot_mapping=torch.cat(slot_mapping).to(self.device),
            query_lens=list(num_new_tokens),
            context_lens=context_lens,
            context_slots=[s.to(self.device) for s in context_slots],
        )
        if self.device.type == "cpu" and kernels.available():
            starts: list[int] = []
            offset = 0
            for n, ctx in zip(num_new_tokens, context_lens):
                starts.extend([offset] * n)
                offset += ctx
            meta.native_slots = torch.cat(context_slots)
            meta.native_starts = torch.tensor(starts, dtype=torch.long)
            meta.native_lens = pos + 1
        if decode_only:
            max_len = max(context_lens)
            padded = torch.zeros(len(seqs), max_len, dtype=torch.long)
            valid = torch.zeros(len(seqs), max_len, dtype=torch.bool)
            for i, s in enumerate(context_slots):
                padded[i, : len(s)] = s
                valid[i, : len(s)] = True
            meta.decode_slots = padded.to(self.device)
            meta.decode_valid = valid.to(self.device)
            meta.decode_positions = torch.tensor(
                [c - 1 for c in context_lens], dtype=torch.long, device=self.device
            )

        with attention_context(meta):
            hidden = self.model(ids, pos)

        rows: list[int] = []
        offset = 0
        for n, wanted in zip(num_new_tokens, logit_rows):
            rows.extend(offset + r for r in wanted)
            offset += n
        if not rows:
            return None
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        return hidden.index_select(0, index)

    # Float LM heads' matmuls may round a row differently with the row count; sampling rows go
    # through them in slices this small so every row takes the same path. Heads whose rows are
    # exact at any count (`row_invariant`: the CPU int8 head) take every row at once.
    SAMPLING_ROWS_PER_CALL = 16

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, batch_invariant: bool = True) -> torch.Tensor:
        """float32 logits [N, vocab] for hidden states [N, hidden], on the model's device."""
        step = self.SAMPLING_ROWS_PER_CALL
        whole = getattr(getattr(self.model, "lm_head", None), "row_invariant", False)
        if whole or not batch_invariant or hidden.shape[0] <= step or self.device.type != "cpu":
            return self.model.compute_logits(hidden).float()
        return torch.cat(
            [
                self.model.compute_logits(hidden[i : i + step]).float()
                for i in range(0, hidden.shape[0], step)
            ]
        )
