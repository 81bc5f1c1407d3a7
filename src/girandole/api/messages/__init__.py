"""POST /v1/messages (also under /inference/v1): Anthropic's Messages API on the chat pipeline;
its Message Batches (`/v1/messages/batches`) are batch jobs of such requests (`batches.py`).

Point the `anthropic` SDK at `base_url="http://<host>/inference"`. The key comes as
`x-api-key` or `Authorization: Bearer`; `anthropic-version` and `anthropic-beta` are ignored.

Request (`schema.py`), translated into a chat request (`convert.py`), so the chat template,
tools and tool-call recognition are chat's (`girandole.api.chat`):
- `system`: a string or text blocks (joined by a blank line): the system message.
- `messages`: `user`/`assistant` turns of a string or blocks. `text` blocks are the text (a
  turn's text blocks joined: by a blank line in user turns, directly in assistant turns);
  `tool_use` blocks (assistant) become the turn's tool calls (`input` as JSON arguments);
  `tool_result` blocks (user) become tool messages before the turn's text (content a string or
  text blocks; `is_error` prefixes `Error: `); an assistant turn's `thinking` blocks are its
  reasoning_content (`redacted_thinking` ones are left out; either in a user turn is a 400).
  A user turn's `image` blocks (a base64 source, its media_type checked against the bytes, or a
  URL source) are chat's image_url parts where they stand, for a vision model (`images.py`; a
  text-only model's 400 names the block); a `file` source, an image elsewhere (an assistant
  turn, a tool_result) and `document` blocks are 400s. Consecutive turns of one role are
  merged. A final assistant turn is continued (a prefill; an empty one is none; one ending in
  whitespace is a 400, as at Anthropic, and so is one under a forced call or output format
  (`convert.check_forced_output`) or `enabled` thinking (`thinking.py`). As at
  Anthropic, any other turn with empty content (`""`, `[]`) and an empty text block are 400s
  (`convert.py`); a turn's `tool_use` blocks are answered by `tool_result` blocks in the next
  turn, a `tool_result` answers a `tool_use` of the turn before, and `tool_use` ids are unique;
  anything else is a 400 (`pairing.py`). Special-token strings in any text (`<end_of_turn>`
  typed by a user) are read as plain text (chat's `safe_tokenization`, always on here).
- `max_tokens` (required, >= 0; fitted to the context as chat fits it; 0 pre-warms the prompt
  cache: the prompt is prefilled, nothing generated, `content: []`, `stop_reason` max_tokens;
  an `enabled` thinking's `budget_tokens`, required and >= 1024, must be under it, as at
  Anthropic: `thinking.py`), `stop_sequences` (at
  most 4, as `stop` elsewhere), `temperature` (0-2), `top_p`, `top_k` (0-100), `metadata`
  (`user_id`, kept as the request's user), `raw_output` (Fireworks: the prompt as fed and the
  raw completion, whole responses only).
- `tools` (`name`, `description`, `input_schema`): function tools. Server tools (a `type` other
  than `custom`) are a 400. `tool_choice`: `auto`, `any` (a call is forced by grammar), `tool`
  (that one, forced), `none` (tools not described); `disable_parallel_tool_use` allows one call.
  A tool's `input_examples` follow its description; `allowed_callers` must hold `direct`;
  `defer_loading` and `eager_input_streaming` change nothing (no tool search; inputs always
  stream).
- `output_config.format` (`{"type": "json_schema", "schema"}`): the output follows the schema
  (chat's response_format). `thinking` is chat's `thinking`, `output_config.effort` chat's
  `reasoning_effort` (`max` read as `high`, as Fireworks does): a template that thinks
  (`girandole.api.chat.reasoning`); `thinking` enabled on a model that cannot reason is a 400,
  `effort` there a hint with nothing to change (Anthropic's effort governs all output);
  `thinking.display: "omitted"` answers the thinking block with empty text (`shape.py`).
  What Anthropic refuses with thinking on is a 400 in its words (`thinking.py`): with
  `enabled` or `adaptive` thinking, a `temperature` other than 1, any `top_k`, a `top_p`
  under 0.95; with `enabled` thinking, a forced call and a prefill (a final assistant turn
  with text to continue: one not starting with a thinking block names its first block).
- `diagnostics`: answered (`shape.diagnostics`: nothing here keeps earlier prompts, so the
  cache-miss reason is `unavailable`). `inference_geo`, `speed`, `user_profile_id` and
  `workspace_id` are accepted and change nothing (one machine, one speed, no workspaces).
- `system` messages inside `messages` (Anthropic's beta; Claude Code sends them): text, read as
  user text where most templates cannot take a system message (`convert.chat_messages`).
- `context_management.edits` (`context_edits.py`): `clear_thinking_20251015` leaves out the
  thinking of all but the last `keep` assistant turns; `clear_tool_uses_20250919`, once the
  prompt passes its trigger, the results (and inputs, as asked) of all but the last `keep` tool
  uses. The response says what was cleared in `context_management.applied_edits`.
- `cache_control` is accepted anywhere Anthropic takes it and changes nothing (the prefix cache
  is automatic).

Response: `{"id": "msg_...", "type": "message", "role": "assistant", "model" (as sent),
"content": [a thinking block, then text or tool_use blocks], "stop_reason", "stop_sequence", "usage":
{"input_tokens", "output_tokens"}}`. A model that thinks: its output up to `</think>` (chat's
reasoning_content) is a `thinking` block first, `signature` empty (nothing is signed here). `stop_reason`: `tool_use` (calls recognised, as chat's
finish_reason "tool_calls"; each call a `tool_use` block, `id` `toolu_<hex>`, `input` the
arguments), `max_tokens`, `model_context_window_exceeded` (cut where the context ends, short of
the client's max_tokens, which was lowered to fit), `stop_sequence` (with the sequence), else
`end_turn`.
`input_tokens` counts every prompt token, template tokens and cached ones included. A call cut
short is its `tool_use` block, `input` as far as it parses; a call forced to one tool is that
tool's block from the first token, so one cut before the model wrote the name is still there
(`input: {}`; `girandole.api.messages.blocks`).

`POST /v1/messages/count_tokens`: the same body without the sampling fields, answered with
`{"input_tokens"}` as the request would be charged (`count_tokens.py`).

Streaming (`stream: true`): named SSE events as Anthropic sends them: `message_start` (the
message, empty content, input_tokens), `ping`, then per block `content_block_start`,
`content_block_delta` (`text_delta`, or `input_json_delta` with the call's arguments in
fragments) and `content_block_stop` (a thinking block: `thinking_delta`s; no `signature_delta`), then `message_delta` (stop_reason, stop_sequence, usage)
and `message_stop`. An error after the stream began is an `error` event.

A whole (non-streamed) message growing past `--max-response-bytes` is a 400 naming the limit,
`stream` and `max_tokens`, its generation stopped (`girandole.api.serving.response_size`); a
stream holds no body and is not bounded.

Errors on this route have Anthropic's shape: `{"type": "error", "error": {"type":
"invalid_request_error", "message": ...}, "request_id"}` (types by status: 401
authentication_error, 404 not_found_error, 413 request_too_large, 429 rate_limit_error, 503
overloaded_error, 500 api_error); the message names the field as elsewhere.
"""
