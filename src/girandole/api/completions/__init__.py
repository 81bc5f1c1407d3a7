"""POST /v1/completions (also under /inference/v1): what differs from chat is here (the route and
its endpoint, the schema, the prompt forms); the rest is the shared pipeline, `girandole.api.serving`.

Choices are indexed prompt-major: prompt i, sample k has index i * n + k.

Usage: `prompt_tokens` counts every prompt once (BOS included, as fed to the model), however
many samples it has; `completion_tokens` sums the tokens generated over all choices (EOS
included); `prompt_tokens_details.cached_tokens` counts, per prompt, the prompt tokens served
from the prefix cache (the smallest figure among that prompt's choices), summed over prompts.

Streaming (SSE): one chunk per new piece of text, one `text: ""` chunk with `finish_reason` per
choice, then (unless `stream_options.include_usage` is false) a usage chunk, then
`data: [DONE]`. With the default placement ("separate", Fireworks' 2026 spec) usage rides its own
final chunk with `choices: []`; with "finish" (the 2025 recordings) each finish chunk carries the
usage so far. An error after the stream started is sent as `data: {"error": {...}}` and the
stream ends without `[DONE]`.

Logprobs, echo, raw_output, return_token_ids, perf metrics and prompt-cache keys are shared
with chat (`girandole.api.serving.choice`). In streams: echoed prompt text (and its logprobs)
leads each choice's first chunk, `prompt_token_ids` rides each choice's first chunk and
`token_ids` every chunk, `raw_output` the choice's finish chunk, and `perf_metrics` the final
chunk (the usage chunk, or the last finish chunk when usage rides the finish chunks or is off).
"""
