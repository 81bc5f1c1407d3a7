"""GpuSampler: the Sampler's work as batched tensor ops on the logits' device, with one host
sync per step (the sampled ids, their logprobs and the top alternatives come back in one copy).

Same order and semantics as Sampler (logit bias, min-tokens EOS suppression, penalties →
temperature → top-k → top-p → min-p → draw): every step is one op over the whole batch, and
decisions that Sampler takes by reading the tensors (which rows use top-p, how many top-k
candidates) are taken here from the rows' parameters on the host. Draws are inverse-CDF with
one uniform per row from the row's own generator (the unseeded rows' from the sampler's), the
same stream as Sampler: a seeded row draws what it would draw alone.

Rows that need the host (a grammar, typical-p, Mirostat, a sampling mask) send their whole step
to Sampler's path, which gives the same results with more syncs.

`launch` / `finish` split a step at that sync for overlap scheduling (engine/engine.py): the
sampled ids stay on the device for the next step's inputs while the host copy is under way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from girandole.model.context import to_device
from girandole.model.kernels.logits import top
from girandole.sampling.params import SamplingParams
from girandole.sampling.sampler import (
    Sampler,
    SampleResult,
    SamplerRow,
    chunk_cdf,
    draw_uniforms,
    inverse_cdf,
    keeps_raw_logits,
    logit_bias_of,
    prompt_tokens_of,
    tempered_probs,
)


def needs_host(params: SamplingParams, grammar: object | None) -> bool:
    """Whether a row takes Sampler's host path (its draw reads host state: the grammar's
    matcher, typical-p, Mirostat, a sampling mask). Overlap scheduling asks the same."""
    return (
        grammar is not None
        or params.typical_p < 1.0
        or params.mirostat_target is not None
        or params.sampling_mask is not None
    )


def _padded(lists: list[list[int]] | list[torch.Tensor], pad: int) -> torch.Tensor:
    """[len(lists), longest] long tensor of `lists`, padded with `pad` (built on the host)."""
    width = max(1, max(len(x) for x in lists))
    out = torch.full((len(lists), width), pad, dtype=torch.long)
    for i, x in enumerate(lists):
        if len(x):
            out[i, : len(x)] = x if isinstance(x, torch.Tensor) else torch.tensor(x)
    return out


@dataclass
class PendingSample:
    """A launched sampling step (GpuSampler.launch): `ids` [B] on the device now, the results
    once `GpuSampler.finish` has waited for `host`."""

    rows: list[SamplerRow]
    ids: torch.Tensor
    host: torch.Tensor | None = None  # the packed results, on the host once `event` is done
    n_top: int = 0
    event: object | None = None  # a CUDA event recorded after the copy (None: done)
    results: list[SampleResult] | None = None


@dataclass
class LastTokens:
    """Rows (indices into a step's rows) whose last token is still on the device, and those
    tokens [len(rows)] (overlap scheduling: the previous step's sampled ids)."""

    rows: list[int]
    ids: torch.Tensor


class GpuSampler(Sampler):
    def __call__(self, logits: torch.Tensor, rows: list[SamplerRow]) -> list[SampleResult]:
        """logits: float32 [B, V] on any device, modified in place. One result per row."""
        if any(needs_host(r.params, r.grammar) for r in rows):
            return super().__call__(logits, rows)
        return self._sample_batched(logits, rows)

    def _sample_batched(self, logits: torch.Tensor, rows: list[SamplerRow]) -> list[SampleResult]:
        return self.finish(self.launch(logits, rows))

    def launch(
        self, logits: torch.Tensor, rows: list[SamplerRow], last: LastTokens | None = None
    ) -> PendingSample:
        """Sample every row without waiting for the device: the chosen ids stay on the device
        (the next step's inputs may gather from them) and their host copy is under way;
        `finish` waits for it. Rows that need the host are sampled now (Sampler's path).
        `last`: rows whose last token is still on the device (a placeholder in `token_ids`):
        the penalties count it there; Sampler's path waits for it and writes it in."""
        if any(needs_host(r.params, r.grammar) for r in rows):
            if last is not None:
                for i, token in zip(last.rows, last.ids.tolist()):
                    rows[i].token_ids[-1] = token
            results = super().__call__(logits, rows)
            ids = torch.tensor([r.token_id for r in results], dtype=torch.long)
            return PendingSample(rows, to_device(ids, logits.device), results=results)
        chosen, packed, n_top = self._sample_on_device(logits, rows, last)
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return PendingSample(rows, chosen, host, n_top, event)
        return PendingSample(rows, chosen, packed, n_top)

    @staticmethod
    def finish(pending: PendingSample) -> list[SampleResult]:
        """The results of a launched sampling step (waits for its one device-to-host copy)."""
        if pending.results is not None:
            return pending.results
        if pending.event is not None:
            pending.event.synchronize()
        results = []
        n_top = pending.n_top
        for r, h in zip(pending.rows, pending.host.tolist()):
            res = SampleResult(int(h[0]))
            n = r.params.logprobs
            if n is not None:
                res.logprob = h[2]
                res.sampling_logprob = h[1]
                ids, values = h[3 : 3 + n_top], h[3 + n_top : 3 + 2 * n_top]
                res.top_logprobs = [(int(t), v) for t, v in zip(ids[:n], values[:n])]
            results.append(res)
        pending.results = results
        return results

    def _sample_on_device(
        self, logits: torch.Tensor, rows: list[SamplerRow], last: LastTokens | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The chosen ids [B] and everything the host needs about them, both on the logits'
        device, and the number of top alternatives packed."""
        dev = logits.device
        B = logits.shape[0]
        n_top = max((r.params.logprobs or 0) for r in rows)
        want_lp = any(r.params.logprobs is not None for r in rows)
        raw_lp = torch.log_softmax(logits, dim=-1) if want_lp else None

        self._bias_and_penalties(logits, rows, last)
        greedy = to_device(torch.tensor([r.params.greedy for r in rows]), dev)
        greedy_ids = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        chosen = greedy_ids
        sampling_lp = torch.zeros(B, dtype=torch.float64, device=dev)
        if want_lp:  # logits as the model gave them: the raw logprob is the sampling one
            plain = all(keeps_raw_logits(r) for r in rows if r.params.greedy)
            source = raw_lp if plain else None
            if source is None:
                source = torch.log_softmax(logits, dim=-1)
            lp = source.gather(1, greedy_ids[:, None])[:, 0]
            sampling_lp = torch.where(greedy, lp.double(), sampling_lp)
        if sampled:
            probs = self._probs_batched(logits, rows)
            u = torch.zeros(B, dtype=torch.float64)
            # one uniform per sampling row, in row order, as Sampler draws
            u[sampled] = draw_uniforms([rows[i] for i in sampled], self.generator)
            drawn, p = inverse_cdf(probs, to_device(u, dev))
            chosen = torch.where(greedy, greedy_ids, drawn)
            sampling_lp = torch.where(greedy, sampling_lp, torch.log(p))

        # Everything the host needs, in one float64 tensor and one copy: ids (< 2**53, exact),
        # the chosen token's raw and sampling logprobs, and the top-n raw alternatives.
        parts = [chosen.double()[:, None], sampling_lp[:, None]]
        if raw_lp is not None:
            parts.append(raw_lp.gather(1, chosen[:, None]).double())
            if n_top:
                values, ids = top(raw_lp, n_top)  # torch's topk off the CPU
                parts += [ids.double(), values.double()]
        return chosen, torch.cat(parts, dim=1), n_top

    # -- logit processors, batched -------------------------------------------------------------

    @staticmethod
    def _bias_and_penalties(
        logits: torch.Tensor, rows: list[SamplerRow], last: LastTokens | None = None
    ) -> None:
        dev, V = logits.device, logits.shape[-1]
        bias_rows, bias_ids, bias_vals, ban_rows, ban_ids = [], [], [], [], []
        for i, r in enumerate(rows):
            p = r.params
            bias = logit_bias_of(r, V)
            if bias is not None:
                bias_rows.append(torch.full_like(bias[0], i))
                bias_ids.append(bias[0])
                bias_vals.append(bias[1])
            if p.min_tokens and len(r.token_ids) - r.num_prompt_tokens < p.min_tokens:
                banned = [t for t in (*r.eos_token_ids, *p.stop_token_ids) if 0 <= t < V]
                ban_rows += [i] * len(banned)
                ban_ids += banned
        if bias_rows:
            index = to_device(torch.stack([torch.cat(bias_rows), torch.cat(bias_ids)]), dev)
            vals = to_device(torch.cat(bias_vals).to(logits.dtype), dev)
            logits.index_put_((index[0], index[1]), vals, accumulate=True)
        if ban_rows:
            index = to_device(torch.tensor([ban_rows, ban_ids], dtype=torch.long), dev)
            logits[index[0], index[1]] = float("-inf")

        pen = [i for i, r in enumerate(rows) if r.params.uses_penalties]
        if not pen:
            return
        # Output token counts and prompt membership, scattered from padded id lists; the pad
        # id V lands in a spare last column that is dropped.
        outputs = to_device(
            _padded([rows[i].token_ids[rows[i].num_prompt_tokens :] for i in pen], V), dev
        )
        if last is not None:  # last tokens still on the device: into their placeholders' cells
            where = {i: k for k, i in enumerate(last.rows)}
            at = [(j, where[i]) for j, i in enumerate(pen) if i in where]
            if at:
                cols = [
                    len(rows[pen[j]].token_ids) - rows[pen[j]].num_prompt_tokens - 1 for j, _ in at
                ]
                index = to_device(torch.tensor([[j for j, _ in at], cols], dtype=torch.long), dev)
                source = to_device(torch.tensor([k for _, k in at], dtype=torch.long), dev)
                outputs[index[0], index[1]] = last.ids.index_select(0, source)
        # each prompt's distinct tokens, made once per request (Sampler's prompt_tokens_of)
        prompts = to_device(_padded([prompt_tokens_of(rows[i]) for i in pen], V), dev)
        counts = torch.zeros(len(pen), V + 1, dtype=logits.dtype, device=dev)
        counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=logits.dtype))
        counts = counts[:, :V]
        in_prompt = torch.zeros(len(pen), V + 1, dtype=torch.bool, device=dev)
        in_prompt.scatter_(1, prompts, True)
        in_prompt = in_prompt[:, :V]
        params = to_device(
            torch.tensor(
                [
                    [
                        rows[i].params.repetition_penalty,
                        rows[i].params.frequency_penalty,
                        rows[i].params.presence_penalty,
                    ]
                    for i in pen
                ],
                dtype=logits.dtype,
            ),
            dev,
        )
        rep, freq, pres = params[:, 0:1], params[:, 1:2], params[:, 2:3]
        idx = to_device(torch.tensor(pen, dtype=torch.long), dev)
        sub = logits.index_select(0, idx)
        seen = in_prompt | (counts > 0)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub -= freq * counts + pres * (counts > 0).to(logits.dtype)
        logits[idx] = sub

    @staticmethod
    def _probs_batched(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        """Every row's filtered sampling distribution (greedy rows' too: their draw is unused)."""
        dev = logits.device
        temps = [r.params.temperature if not r.params.greedy else 1.0 for r in rows]
        temps_t = to_device(torch.tensor(temps, dtype=logits.dtype), dev)
        probs = tempered_probs(logits, temps_t)  # in place: logits are not read after this
        V = probs.shape[-1]

        top_ks = [r.params.top_k for r in rows]
        if any(k > 0 for k in top_ks):
            values = probs.topk(min(max(top_ks), V), dim=-1).values
            k_idx = [min(max(k, 1), values.shape[-1]) - 1 for k in top_ks]
            kth = values.gather(1, to_device(torch.tensor(k_idx, dtype=torch.long), dev)[:, None])
            off = to_device(torch.tensor([k == 0 for k in top_ks]), dev)
            kth = kth.masked_fill(off[:, None], 0.0)
            probs = probs.masked_fill(probs < kth, 0.0)

        top_ps = [r.params.top_p for r in rows]
        if any(p < 1.0 for p in top_ps):
            # The smallest set of most likely tokens whose mass reaches top_p (ties kept);
            # chunk_cdf for the total, as Sampler, so a row's cutoff ignores its neighbours.
            total = chunk_cdf(probs)[:, -1].to(probs.dtype)
            ordered = probs.sort(dim=-1, descending=True).values
            mass = ordered.cumsum(dim=-1)
            top_p_t = to_device(torch.tensor(top_ps, dtype=probs.dtype), dev)
            j = torch.searchsorted(mass, (top_p_t * total)[:, None]).clamp(max=V - 1)
            cutoff = ordered.gather(1, j).masked_fill(top_p_t[:, None] >= 1.0, 0.0)
            probs = probs.masked_fill(probs < cutoff, 0.0)

        min_ps = [r.params.min_p for r in rows]
        if any(p > 0 for p in min_ps):
            min_p_t = to_device(torch.tensor(min_ps, dtype=probs.dtype), dev)
            threshold = probs.max(dim=-1, keepdim=True).values * min_p_t[:, None]
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs
