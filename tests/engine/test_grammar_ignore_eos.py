"""A finished grammar ends its request even with ignore_eos (the matcher accepts nothing after
its stop token), and the free rows beside it go on."""

from __future__ import annotations

import re

from girandole import LLM, SamplingParams
from girandole.sampling.grammar import GrammarSpec


def test_grammar_with_ignore_eos_ends_at_the_grammar(tiny_llama_dir):
    llm = LLM(
        model=str(tiny_llama_dir), mode="reference", device="cpu", block_size=4, kv_cache_gb=0.01
    )
    spec = GrammarSpec("gbnf", 'root ::= "yes" | "no"')
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=12, ignore_eos=True,
                       grammar=spec if i % 2 else None)
        for i in range(4)
    ]  # fmt: skip
    outs = llm.generate(["Answer:"] * 4, params)
    for i, out in enumerate(outs):
        if i % 2:
            assert re.fullmatch("yes|no", out.text) and out.finish_reason == "stop", out
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == 12
