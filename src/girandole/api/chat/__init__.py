"""POST /v1/chat/completions (also under /inference/v1): messages through the chat template to
engine requests, and back.

What differs from /completions is here: the route and its endpoint, the schema, the prompt
(`prompt.py`), tools (`tools.py`, `tool_calls.py`) and the response shape (`shape.py`). The rest
is the shared pipeline (`girandole.api.serving`): per-choice SamplingParams, the context-length
rules, usage counting, starting and aborting the engine requests, the collect and stream loops.

Prompt:
- The template is `--chat-template` if given, else the model's own (tokenizer_config.json or the
  GGUF's `tokenizer.chat_template`), else the built-in one of the model's family (Gemma,
  Llama 3, Llama 2, ChatML) found from its turn-marker tokens. A model with none of these has no
  chat (`supports_chat: false` in /models, 400 here).
- A system message with empty content is left out ("to completely omit the system prompt, set
  its content to an empty string").
- A final assistant message is continued: rendered open, without a generation prompt (an empty
  one is dropped instead, which leaves the generation prompt).
- BOS is not doubled: templates that write it get no second one from the tokenizer.
- `prompt_truncate_len`: while the prompt has more tokens than that, the oldest turns go (a turn
  starts at a user message, so roles still alternate); the system prompt and the last user turn
  stay. If that is still too long, the system prompt goes too; if even the last turn alone is too
  long, 400.
- The template's end-of-turn token (`<end_of_turn>`, `<|eot_id|>`, `<|im_end|>`...) is one of the
  tokenizer's stop tokens, so it ends generation, like EOS, and counts as a completion token.

Responses: `max_tokens` defaults to 2048 (Fireworks' chat guide); usage as /completions (template
tokens and BOS in `prompt_tokens`). Logprobs, echo (the templated prompt's text before the
answer), raw_output, return_token_ids, perf metrics and prompt-cache keys work as on
/completions (`girandole.api.serving.choice`, one formatter for both endpoints); with
return_token_ids the body (streams: the first chunk) also carries `prompt_token_ids`, where
Fireworks' chat schema puts them.

Streaming: per choice a role chunk (`delta: {"role": "assistant"}`), sent first for every choice,
then content chunks (each with its tokens' logprobs and `token_ids` when asked), then a
`delta: {}` chunk with `finish_reason` (and `raw_output`); choices interleave, each chunk carries one choice's `index`.
Usage is placed as in /completions (`--stream-usage`), then `data: [DONE]`.
"""
