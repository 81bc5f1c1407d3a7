"""Sampler: turns a batch of logits into next tokens, each row with its own parameters.

Order (as vLLM): raw log-softmax for `logprob` → logit bias, min-tokens EOS suppression,
penalties → temperature → top-k → top-p → min-p → typical-p → Mirostat → draw. Each step runs as
one tensor operation over the rows that use it. Drawing is inverse-CDF with one uniform per row:
a seeded row draws from its own generator, so its batch neighbours never change its choice.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from girandole.model.kernels.logits import argmax_rows, sampling_weights, top, top_values
from girandole.sampling.params import SamplingParams

# Top-p is exact: the nucleus is looked for among the top candidates first and the full vocabulary
# is sorted only for rows whose nucleus is wider than that.
_TOP_P_CANDIDATES = 256
# Typical-p likewise: its first candidates (the closest to the entropy), 4x more while short.
_TYPICAL_CANDIDATES = 256
# Inverse-CDF draws find the point's chunk of this many tokens first, then the token inside it.
DRAW_CHUNK = 1024
# Sampling weights are exp(x / t - max): 0 at or below this exponent (csrc/logits.c's floor).
WEIGHT_FLOOR = -87.0


@dataclass
class SamplerRow:
    params: SamplingParams
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)  # prompt + output so far
    num_prompt_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()
    state: dict = field(default_factory=dict)  # per-request sampler state (Mirostat's mu)
    grammar: object | None = None  # a SequenceGrammar (girandole.sampling.grammar)


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # the model's raw log-softmax of the chosen token
    sampling_logprob: float | None = None  # after bias, penalties, temperature and filters
    top_logprobs: list[tuple[int, float]] | None = None  # raw top-N, most likely first
    dead_end: bool = False  # the grammar allowed no token at all: nothing was chosen
    # params.sampling_mask: the tokens the sampling distribution allowed (non-zero probability),
    # ascending (an array: a list of up to 262k Python ints took ~9 ms a row on the engine thread)
    sampling_mask: np.ndarray | None = None
    # params.routing_matrix: the expert ids each MoE layer's router chose at the position that
    # predicted this token, int16 [MoE layers, top-k] (None: no such position, or not asked)
    routing: np.ndarray | None = None


# The last few logit_bias dicts made into tensors, by identity: the n choices of a request share
# one dict (their SamplingParams are copies), and a vocabulary-wide bias took ~0.1 s of the
# engine thread to convert, once per choice (n 32: seconds of every stream's time).
_BIAS_TENSORS: OrderedDict[int, tuple[dict, int, torch.Tensor, torch.Tensor]] = OrderedDict()
_BIAS_TENSORS_KEPT = 8
_BIAS_LOCK = threading.Lock()  # engines of several deployments sample on their own threads


def logit_bias_of(row: SamplerRow, vocab: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The row's logit_bias as (token ids, biases) tensors on the host, ids past `vocab` left
    out; made once per request and kept in its sampler state (rebuilt from the dict at every
    step, a 200,000-entry bias cost 100 ms of each step the request was in), and shared by the
    requests that hold the same dict."""
    bias = row.params.logit_bias
    if not bias:
        return None
    cached = row.state.get("logit_bias")
    if cached is None or cached[0] != vocab:
        with _BIAS_LOCK:
            shared = _BIAS_TENSORS.get(id(bias))
            if shared is not None and shared[0] is bias and shared[1] == vocab:
                _BIAS_TENSORS.move_to_end(id(bias))
            else:
                ids = torch.tensor(list(bias), dtype=torch.long)
                biases = torch.tensor(list(bias.values()), dtype=torch.float32)
                keep = (ids >= 0) & (ids < vocab)
                if not bool(keep.all()):
                    ids, biases = ids[keep], biases[keep]
                shared = _BIAS_TENSORS[id(bias)] = (bias, vocab, ids, biases)
                while len(_BIAS_TENSORS) > _BIAS_TENSORS_KEPT:
                    _BIAS_TENSORS.popitem(last=False)
        cached = row.state["logit_bias"] = (vocab, shared[2], shared[3])
    return cached[1], cached[2]


def prompt_tokens_of(row: SamplerRow) -> torch.Tensor:
    """The distinct tokens of the row's prompt, made once per request and kept in its sampler
    state (a 32k-token prompt cost a tensor and a sort at every step of a penalised row)."""
    cached = row.state.get("prompt_tokens")
    if cached is None or cached[0] != row.num_prompt_tokens:
        ids = torch.tensor(row.token_ids[: row.num_prompt_tokens], dtype=torch.long)
        cached = row.state["prompt_tokens"] = (row.num_prompt_tokens, torch.unique(ids))
    return cached[1]


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x's rows `rows` (x itself when they are all of them, in order)."""
    if rows == list(range(x.shape[0])):
        return x
    return x.index_select(0, torch.tensor(rows, device=x.device))


def _put_rows(x: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    """Write `values` (what _rows(x, rows) gave, changed) back into x's rows `rows`."""
    if values is not x:
        x.index_copy_(0, torch.tensor(rows, device=x.device), values)


def top_logprobs(logprobs: torch.Tensor, n: int) -> list[list[tuple[int, float]]]:
    """The n most likely (token id, logprob) pairs of each row of a [R, V] logprob tensor."""
    if n <= 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = top(logprobs, n)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def tempered_probs(logits: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """Each row's sampling weights exp(x / t - max(x / t)) for logits x at temperature t:
    softmax without its division (the most likely token weighs exactly 1; every consumer
    divides by the row's total where it needs probabilities). Computed in place in `logits`,
    which it returns: a [B, V] temporary costs more than the arithmetic on CPU (fresh pages).
    On CPU one native kernel does it in two passes over the rows; elsewhere torch's ops. A
    token more than WEIGHT_FLOOR below the maximum after the division (a banned one at -inf
    too) weighs exactly 0 on every device (the native exp stops there)."""
    if sampling_weights(logits, temps):
        return logits
    logits.div_(temps[:, None])
    logits.sub_(logits.amax(dim=-1, keepdim=True))
    logits.masked_fill_(logits <= WEIGHT_FLOOR, float("-inf"))
    return logits.exp_()


def chunk_cdf(weights: torch.Tensor) -> torch.Tensor:
    """float64 [B, ceil(V / DRAW_CHUNK)]: each row's cumulative weight at the end of each chunk
    of DRAW_CHUNK tokens; the last column is the row's total. One pass over the weights; a
    row's numbers do not depend on its batch neighbours (each chunk is one reduction)."""
    b, v = weights.shape
    full = v // DRAW_CHUNK * DRAW_CHUNK
    parts = [weights[:, :full].reshape(b, -1, DRAW_CHUNK).sum(dim=-1)] if full else []
    if full < v:
        parts.append(weights[:, full:].sum(dim=-1, keepdim=True))
    sums = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return sums.double().cumsum(dim=-1)


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's token at the point u [B] (in [0, 1), float64) of its weights' CDF, and that
    token's probability (float64). Two levels, so no [B, V] cumulative sum: the chunk holding
    the point (chunk_cdf), then the token inside that chunk. The chosen token never has weight
    0 (side="right": the first position whose cumulative weight exceeds the point)."""
    b, v = weights.shape
    cdf = chunk_cdf(weights)
    total = cdf[:, -1]
    point = (u * total)[:, None]
    chunk = torch.searchsorted(cdf, point, side="right").clamp(max=cdf.shape[1] - 1)
    before = torch.where(chunk > 0, cdf.gather(1, (chunk - 1).clamp(min=0)), 0.0)
    offsets = torch.arange(DRAW_CHUNK, device=weights.device)
    cols = chunk * DRAW_CHUNK + offsets  # [B, DRAW_CHUNK]
    inside = cols < v
    vals = weights.gather(1, cols.clamp(max=v - 1)).masked_fill(~inside, 0.0).double()
    k = torch.searchsorted(vals.cumsum(dim=-1) + before, point, side="right")
    # Past the chunk's end only by rounding (its sum and its running sum differ in the last
    # bits): its last token with weight (a row without weight, which no caller sends: its first).
    last = torch.where(vals > 0, offsets, 0).amax(dim=-1, keepdim=True)
    k = torch.where(k >= DRAW_CHUNK, last, k)
    idx = (chunk * DRAW_CHUNK + k)[:, 0]
    return idx, weights.gather(1, idx[:, None])[:, 0].double() / total


def keeps_raw_logits(row: SamplerRow) -> bool:
    """Whether bias, min-tokens, penalties and grammar leave the row's logits as the model gave
    them (a greedy row's sampling logprob is then its raw one)."""
    p = row.params
    banning = p.min_tokens and len(row.token_ids) - row.num_prompt_tokens < p.min_tokens
    return row.grammar is None and not p.logit_bias and not p.uses_penalties and not banning


def draw_uniforms(rows: list[SamplerRow], shared: torch.Generator) -> torch.Tensor:
    """One float64 uniform per row, in row order, each from the row's generator or `shared`:
    the shared rows' draws in one call (the same numbers as one call each)."""
    u = torch.empty(len(rows), dtype=torch.float64)
    own = [i for i, r in enumerate(rows) if r.generator is not None]
    if len(own) < len(rows):
        rest = [i for i, r in enumerate(rows) if r.generator is None]
        u[rest] = torch.rand(len(rest), generator=shared, dtype=torch.float64)
    for i in own:
        u[i] = torch.rand(1, generator=rows[i].generator, dtype=torch.float64)
    return u


class Sampler:
    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, rows: list[SamplerRow]) -> list[SampleResult]:
        """logits: float32 [B, V], modified in place. Returns one result per row."""
        B = logits.shape[0]
        dev = logits.device
        want_lp = [r.params.logprobs is not None for r in rows]
        asking = [i for i in range(B) if want_lp[i]]
        # The raw log-softmax of the asking rows only (row j of raw_lp: rows[asking[j]]): one
        # row's logprobs made a [B, V] pass that every row of the batch waited for
        raw_lp = None
        if asking:
            raw_lp = torch.log_softmax(_rows(logits, asking), dim=-1)

        self._apply_bias_and_penalties(logits, rows)
        dead = self._apply_grammars(logits, rows)

        chosen = torch.empty(B, dtype=torch.long, device=dev)
        sampling_lp = torch.zeros(B, dtype=torch.float64, device=dev)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if greedy:
            idx = torch.tensor(greedy, device=dev)
            g = logits if len(greedy) == B else logits.index_select(0, idx)
            ids = argmax_rows(g)
            chosen[idx] = ids
            told = [j for j, i in enumerate(greedy) if want_lp[i]]  # greedy rows that ask
            if told:
                at = [greedy[j] for j in told]
                told_ids = ids if len(told) == len(greedy) else ids[told]
                if all(keeps_raw_logits(rows[i]) for i in at):
                    # Logits as the model gave them: the raw logprob is the sampling one.
                    source = _rows(raw_lp, [asking.index(i) for i in at])
                else:
                    source = torch.log_softmax(_rows(g, told), dim=-1)
                sampling_lp[at] = source.gather(1, told_ids[:, None])[:, 0].double()
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            idx = torch.tensor(sampled, device=dev)
            sub_rows = [rows[i] for i in sampled]
            # _probs works in place: on the logits themselves when no row reads them after
            sub = logits if len(sampled) == B else logits.index_select(0, idx)
            probs = self._probs(sub, sub_rows)
            ids, p = self._draw(probs, sub_rows)
            chosen[idx] = ids
            sampling_lp[idx] = torch.log(p)

        results = [SampleResult(int(t)) for t in chosen.tolist()]
        for i in dead:
            results[i].dead_end = True
        if any(r.params.sampling_mask is not None for r in rows):
            self._masks(results, rows, sampled, probs if sampled else None, set(dead))
        if raw_lp is not None:
            chosen_lp = raw_lp.gather(1, _rows(chosen, asking)[:, None])[:, 0].tolist()
            sampling = sampling_lp.tolist()
            n_top = max(rows[i].params.logprobs for i in asking)
            # one top-n over every asking row (per row, torch's topk over 262k costs ~0.8 ms)
            tops = top_logprobs(raw_lp, n_top)
            for j, (i, top) in enumerate(zip(asking, tops)):
                res = results[i]
                res.logprob = chosen_lp[j]
                res.sampling_logprob = sampling[i]
                res.top_logprobs = top[: rows[i].params.logprobs]
        return results

    @staticmethod
    def _masks(
        results: list[SampleResult],
        rows: list[SamplerRow],
        sampled: list[int],
        probs: torch.Tensor | None,
        dead: set[int],
    ) -> None:
        """The non-zero set of each row's sampling distribution, for rows that ask for it:
        greedy rows allow only their argmax; a grammar dead end allows nothing."""
        position = {row: j for j, row in enumerate(sampled)}
        for i, r in enumerate(rows):
            if r.params.sampling_mask is None:
                continue
            if i in dead:
                allowed = np.zeros(0, dtype=np.int32)
            elif i in position and probs is not None:
                allowed = probs[position[i]].nonzero()[:, 0].to(torch.int32).cpu().numpy()
            else:
                allowed = np.array([results[i].token_id], dtype=np.int32)
            results[i].sampling_mask = allowed

    # -- logit processors ------------------------------------------------------------------

    @staticmethod
    def _apply_bias_and_penalties(logits: torch.Tensor, rows: list[SamplerRow]) -> None:
        V = logits.shape[-1]
        for i, r in enumerate(rows):
            p = r.params
            bias = logit_bias_of(r, V)
            if bias is not None:
                logits[i].index_add_(0, bias[0], bias[1].to(logits.dtype))
            if p.min_tokens and len(r.token_ids) - r.num_prompt_tokens < p.min_tokens:
                banned = [t for t in (*r.eos_token_ids, *p.stop_token_ids) if 0 <= t < V]
                if banned:
                    logits[i, banned] = float("-inf")

        # Penalties change only the tokens a row has seen (its prompt and output): gathered,
        # changed and written back, never a [rows, vocab] pass (with a 262k vocab those took
        # most of a decode step; the same float32 operations, so the same logits)
        dev, dtype = logits.device, logits.dtype
        for i, r in enumerate(rows):
            p = r.params
            if not p.uses_penalties or not r.token_ids:
                continue
            out = torch.tensor(r.token_ids[r.num_prompt_tokens :], dtype=torch.long, device=dev)
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.unique(torch.cat([prompt_tokens_of(r).to(dev), out]))
                rep = torch.tensor(p.repetition_penalty, dtype=dtype, device=dev)
                x = row[seen]
                row[seen] = torch.where(x > 0, x / rep, x * rep)
            if (p.frequency_penalty or p.presence_penalty) and out.numel():
                tokens, counts = torch.unique(out, return_counts=True)
                freq = torch.tensor(p.frequency_penalty, dtype=dtype, device=dev)
                pres = torch.tensor(p.presence_penalty, dtype=dtype, device=dev)
                row[tokens] -= freq * counts.to(dtype) + pres

    @staticmethod
    def _apply_grammars(logits: torch.Tensor, rows: list[SamplerRow]) -> list[int]:
        """Mask each constrained row to its grammar's allowed tokens; returns rows left with none.

        Those rows get a uniform dummy distribution so the batch still samples; their result is
        flagged and discarded by the engine.
        """
        constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
        if not constrained:
            return []
        from girandole.sampling.grammar import allocate_bitmask, apply_bitmask

        bitmask = allocate_bitmask(logits.shape[0], logits.shape[-1])
        for i in constrained:
            rows[i].grammar.fill_bitmask(bitmask, i)
        apply_bitmask(logits, bitmask, constrained)
        dead = [i for i in constrained if not bool(torch.isfinite(logits[i]).any())]
        for i in dead:
            logits[i] = 0.0
        return dead

    def _probs(self, logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        dev = logits.device
        temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype, device=dev)
        probs = tempered_probs(logits, temps)

        # Each filter runs over the rows that use it only: one row's top_k, top_p or min_p made
        # a pass over every sampled row's vocabulary, which the whole batch waited for
        using = [i for i, r in enumerate(rows) if r.params.top_k > 0]
        if using:
            sub = _rows(probs, using)
            top_ks = [rows[i].params.top_k for i in using]
            values = top_values(sub, min(max(top_ks), sub.shape[-1]))
            k_idx = torch.tensor([min(k, values.shape[-1]) - 1 for k in top_ks], device=dev)
            kth = values.gather(1, k_idx[:, None])
            _put_rows(probs, using, sub.masked_fill_(sub < kth, 0.0))

        using = [i for i, r in enumerate(rows) if r.params.top_p < 1.0]
        if using:
            top_ps = [rows[i].params.top_p for i in using]
            top_ps_t = torch.tensor(top_ps, dtype=probs.dtype, device=dev)
            _put_rows(probs, using, self._top_p(_rows(probs, using), top_ps_t))

        using = [i for i, r in enumerate(rows) if r.params.min_p > 0]
        if using:
            sub = _rows(probs, using)
            min_ps = [rows[i].params.min_p for i in using]
            min_ps_t = torch.tensor(min_ps, dtype=probs.dtype, device=dev)
            # amax, not max: max(dim) also finds the indices, on every thread even for a few
            # rows (~7 ms a call on a busy 2-core host instead of microseconds)
            threshold = sub.amax(dim=-1, keepdim=True) * min_ps_t[:, None]
            _put_rows(probs, using, sub.masked_fill_(sub < threshold, 0.0))

        typical = [i for i, r in enumerate(rows) if r.params.typical_p < 1.0]
        for i in typical:
            probs[i] = self._typical(probs[i], rows[i].params.typical_p)
        for i, r in enumerate(rows):
            if r.params.mirostat_target is not None:
                probs[i] = self._mirostat_filter(probs[i], r)
        return probs

    @staticmethod
    def _top_p(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
        """Keep the smallest set of most likely tokens whose mass reaches top_p (ties kept)."""
        # chunk_cdf, not sum: torch's sum over one long row rounds differently from the same
        # row in a batch; a row's cutoff must not depend on its batch neighbours.
        total = chunk_cdf(probs)[:, -1].to(probs.dtype)
        k = min(_TOP_P_CANDIDATES, probs.shape[-1])
        values = top_values(probs, k)  # sorted descending
        mass = values.cumsum(dim=-1)
        target = top_ps * total
        cutoff = torch.zeros_like(total)
        vocab = probs.shape[-1]
        for i in range(probs.shape[0]):
            if top_ps[i] >= 1.0:
                continue
            row_values, row_mass = values[i], mass[i]
            while row_mass[-1] < target[i] and len(row_values) < vocab:
                # A nucleus wider than the candidates: more of them, twice as many as the
                # missing mass needs at least (none weighs more than the last candidate); past
                # half the vocabulary, a sort. The top n of a sort either way, so the cutoff is
                # the full sort's.
                need = len(row_values) + float((target[i] - row_mass[-1]) / row_values[-1])
                n = vocab if 2 * need >= vocab else 1 << int(2 * need).bit_length()
                if n >= vocab:
                    row_values = probs[i].sort(descending=True).values
                else:
                    row_values = top_values(probs[i : i + 1], n)[0]
                row_mass = row_values.cumsum(dim=0)
            j = int(torch.searchsorted(row_mass, target[i]).clamp(max=len(row_values) - 1))
            cutoff[i] = row_values[j]
        return probs.masked_fill_(probs < cutoff[:, None], 0.0)

    @staticmethod
    def _typical(p: torch.Tensor, mass: float) -> torch.Tensor:
        """Locally typical sampling: keep the tokens whose surprise is closest to the entropy,
        in that order, until their mass reaches `mass`."""
        q = p / p.sum()
        logq = torch.log(q.clamp_min(1e-30))
        entropy = -(q * logq).sum()
        distance = (-logq - entropy).abs()
        target = torch.tensor(mass, dtype=q.dtype, device=q.device)
        # The closest candidates first, more while their mass falls short: the start of the
        # full order, without sorting the vocabulary (an argsort of 262k per row per step
        # cost 25 ms a row; the mass is nearly always within the first few hundred)
        k = min(_TYPICAL_CANDIDATES, len(q))
        while True:
            if k < len(q):
                order = distance.topk(k, largest=False).indices
            else:
                order = distance.argsort()
            cum = q[order].cumsum(0)
            if k >= len(q) or bool(cum[-1] >= target):
                break
            k = min(4 * k, len(q))
        last = int(torch.searchsorted(cum, target).clamp(max=len(order) - 1))
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[order[: last + 1]] = True
        return p.masked_fill(~keep, 0.0)

    @staticmethod
    def _mirostat_filter(p: torch.Tensor, row: SamplerRow) -> torch.Tensor:
        """Mirostat v2: drop tokens whose surprise exceeds mu (the most likely one always stays)."""
        tau = row.params.mirostat_target
        mu = row.state.setdefault("mirostat_mu", 2.0 * tau)
        q = p / p.sum()
        surprise = -torch.log2(q.clamp_min(1e-30))
        keep = surprise <= mu
        keep[q.argmax()] = True
        return p.masked_fill(~keep, 0.0)

    def _draw(
        self, probs: torch.Tensor, rows: list[SamplerRow]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one token per row; also returns its probability under the filtered distribution."""
        u = draw_uniforms(rows, self.generator).to(probs.device)
        idx, p = inverse_cdf(probs, u)
        for i, r in enumerate(rows):
            if r.params.mirostat_target is not None:  # Mirostat v2 learning step
                surprise = -math.log2(max(float(p[i]), 1e-30))
                mu = r.state["mirostat_mu"]
                r.state["mirostat_mu"] = mu - r.params.mirostat_lr * (
                    surprise - r.params.mirostat_target
                )
        return idx, p
