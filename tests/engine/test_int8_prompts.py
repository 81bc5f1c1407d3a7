"""EngineConfig.int8_prompts: on a CPU without AMX, fast mode runs the linears' decode rows on
the int8 kernel and prompt rows on the bf16 one; with the switch a prompt row takes the int8
kernel too, so a token computed in a prompt has the numbers it has when it is generated. The
echo of a generated text then scores it with its generation's logprobs exactly, and a
preempted sequence's recompute gives back what it would have generated."""

from __future__ import annotations

import pytest
import torch

from girandole import LLM, SamplingParams
from girandole.model.context import ForwardContext, forward_context
from girandole.model.kernels import loader, wq_gemm
from girandole.model.quant import PackedLinear

pytestmark = pytest.mark.skipif(
    not wq_gemm.vnni_default(),
    reason="one kernel for every row here (AMX, GIRANDOLE_VNNI=0 or no native kernels)",
)

PROMPT = "It kept its keys and values in pages, shared prefixes between prompts"


def make_llm(path, int8_prompts: bool | None, **kw) -> LLM:
    kw.setdefault("mode", "fast")
    return LLM(model=str(path), device="cpu", int8_prompts=int8_prompts, **kw)


def echo_gap(llm: LLM) -> list[float]:
    """Per generated token: its generation's logprob minus the echo's (prompt logprobs of the
    prompt followed by the generated tokens)."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    out = llm.generate(PROMPT, params)[0]
    ids = llm.tokenizer.encode(PROMPT)
    echo = llm.generate(
        ids + out.token_ids, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    )[0]
    scored = echo.prompt_logprobs[len(ids) :]
    assert [r.token_id for r in scored] == out.token_ids
    return [g.logprob - e.logprob for g, e in zip(out.logprobs, scored)]


def test_the_echo_of_a_generated_text_has_its_logprobs_exactly(tiny_llama_dir):
    assert loader.available()
    assert echo_gap(make_llm(tiny_llama_dir, True)) == [0.0] * 16
    # Without the switch the prompt rows' bf16 activations give other numbers.
    assert any(gap != 0.0 for gap in echo_gap(make_llm(tiny_llama_dir, False)))


def test_a_preempted_sequence_generates_what_it_would_have(tiny_llama_dir):
    prompts = [PROMPT, "Once upon a time", "def main():\n    return", "0123456789 0123"]
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, seed=11, logprobs=2)
    roomy = make_llm(tiny_llama_dir, True, block_size=4)
    alone = [roomy.generate(p, params)[0] for p in prompts]
    # Room for about 80 tokens: four prompts growing by 24 tokens each cannot all fit.
    per_token = roomy.engine.runner.num_blocks * 4 / (1 << 30)
    tight = make_llm(tiny_llama_dir, True, block_size=4, kv_cache_gb=80 / per_token / (1 << 30))
    outs = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    for out, ref in zip(outs, alone):
        assert [r.top_logprobs for r in out.logprobs] == [r.top_logprobs for r in ref.logprobs]


def test_a_linears_prompt_rows_take_the_decode_rows_kernel(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir, False)
    linear = next(m for m in llm.engine.model.modules() if isinstance(m, PackedLinear))
    assert linear.native_bits & wq_gemm.VNNI
    x = torch.randn(12, linear.in_features, generator=torch.Generator().manual_seed(0))
    empty = torch.zeros(0, dtype=torch.long)

    def step(decode: int, int8_prompts: bool) -> torch.Tensor:
        ctx = ForwardContext(empty, [], [], [], num_decode_rows=decode, int8_prompts=int8_prompts)
        with forward_context(ctx):
            return linear(x)

    as_decode = step(12, False)
    assert torch.equal(step(2, True), as_decode)
    assert torch.equal(step(0, True), as_decode)
    bf16_prompts = step(2, False)
    assert torch.equal(bf16_prompts[:2], as_decode[:2])
    assert not torch.equal(bf16_prompts[2:], as_decode[2:])


def test_the_setting_reaches_the_runner(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("GIRANDOLE_INT8_PROMPTS", "yes")
    assert make_llm(tiny_llama_dir, None).engine.runner.int8_prompts
    assert not make_llm(tiny_llama_dir, False).engine.runner.int8_prompts
    monkeypatch.setenv("GIRANDOLE_INT8_PROMPTS", "maybe")
    with pytest.raises(ValueError, match="GIRANDOLE_INT8_PROMPTS"):
        make_llm(tiny_llama_dir, None)


def test_where_it_changes_nothing_the_engine_says_so(tiny_llama_dir, caplog):
    with caplog.at_level("WARNING", logger="girandole.engine.engine"):
        make_llm(tiny_llama_dir, True, mode="reference")
    assert "int8_prompts changes nothing here" in caplog.text
    assert "reference mode" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="girandole.engine.engine"):
        make_llm(tiny_llama_dir, True)
    assert "int8_prompts" not in caplog.text
