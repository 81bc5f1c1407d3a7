"""POST /v1/responses (also under /inference/v1): OpenAI's Responses API on the chat pipeline,
and the stored responses. Point the openai SDK at `base_url="http://<host>/inference/v1"`.

Request (`schema.py`), translated into a chat request (`convert.py`), so the chat template,
tools, tool-call recognition and structured output are chat's (`girandole.api.chat`):
- `input`: a string (one user message) or items: `message` (`role` user, assistant, system or
  `developer` (= system; after another turn, stored ones included, user text, as Messages
  reads a later system message); `content` a string or `input_text`/`output_text`/`refusal` parts;
  for a vision model, a user message's `input_image` parts (`image_url`: a data: URL or an
  http(s) URL; `detail` accepted, no effect; a `file_id` is a 400) are chat's image_url parts
  where they stand, stored as sent, so a later turn chained to them sends them again; file and
  audio parts are a 400), `function_call` (the assistant's call: `call_id`,
  `name`, `arguments`), `function_call_output` (`call_id`, `output`: a string or text parts).
  `reasoning` items (their content's text, else their summary's) are the reasoning_content of
  the assistant turn after them; MCP items (`mcp_list_tools`, `mcp_call`,
  `mcp_approval_request`, `mcp_approval_response`: `mcp.py`) as the server wrote them; other
  item types are a 400. Consecutive messages of one role are merged; function_call (and
  mcp_call) items join the assistant message before them as its tool calls.
  As at OpenAI, a `function_call_output` without an earlier `function_call` of its `call_id`
  (stored turns included) and a `function_call` never answered are 400s (`pairing.py`).
  Special-token strings in any text are read as plain text (chat's `safe_tokenization`).
- `instructions`: the system message, first. Not carried over by `previous_response_id` (as at
  OpenAI): send it again with each turn that needs it.
- `previous_response_id`: the stored response's conversation (its input items, then its output
  items), then this request's input. A response this key's account did not store is a 400
  naming the field.
- `store` (default true): keep the response (`registry/responses.py`); false: it is answered,
  with an id, but cannot be retrieved or chained from.
- `max_output_tokens` (default 2048, fitted to the context as chat fits it), `temperature`
  (0-2), `top_p`, `tools` (function tools: `name`, `description`, `parameters`, `strict`;
  MCP servers, `{"type": "mcp" | "sse", "server_url", ...}`, whose tools this server lists and
  calls itself in a loop of engine rounds: `mcp.py`, `shape.py`; `namespace` tools, function
  tools under a name, offered as plain functions, their calls' items naming the namespace;
  other tool types are a 400),
  `tool_choice` (`none`, `auto`, `required`, `{"type": "function", "name"}`,
  `{"type": "allowed_tools", "mode", "tools"}`, `{"type": "mcp", "server_label", "name"}`),
  `parallel_tool_calls`,
  `text.format` (`text`, `json_object`, `json_schema` with `schema`: chat's response_format),
  `metadata` (at most 16 string pairs, keys up to 64 characters, values up to 512: OpenAI's
  limits; echoed and stored), `user` / `safety_identifier` (the request's user; echoed),
  `prompt_cache_key` (as on chat; echoed), `stream_options.include_obfuscation` (accepted; no
  padding is sent), `client_metadata` (the Codex CLI's labels: accepted, unused).
- `reasoning.effort`: chat's `reasoning_effort` (`minimal` read as `low`); `reasoning.summary`
  is accepted and echoed, and the reasoning comes whole as its text (never summarized).
- `truncation`: `disabled` (default), or `auto`: chat's `prompt_truncate_len` at the context
  less room for the output (max_output_tokens, else 2048; at most half the context), so the
  oldest turns go first; a last turn alone too long is a 400 naming `input`.
- `max_tool_calls`: the first N calls are the output's, MCP calls of every round included (1:
  decoded as one call).
- `include: ["message.output_text.logprobs"]` and/or `top_logprobs` (chat's cap): the text
  part's `logprobs`, chat's for the tokens after the reasoning; each stream delta carries those
  of its tokens, `output_text.done` all of them. `include: ["reasoning.encrypted_content"]`:
  reasoning items carry `encrypted_content: null` (their text is in the clear in `content`).
  Other values are a 400.
- `conversation` (an id or `{"id"}`; not with `previous_response_id`): the Conversations API's
  conversation (`girandole.api.conversations`): its items, then the input; the input and
  output items are appended to it when the response ends.
- `background: true` (with `store`): answered at once, `queued`; the work runs on, to be
  polled, cancelled or streamed again (`background.py`).
- `service_tier`: chat's (`priority` ahead of the default tier; `auto`, `default`, `flex`: the
  default tier), echoed as the tier that ran it (`priority` or `default`).
- Not run here, a 400 unless the value asks for nothing: `prompt`, `prompt_cache_retention`
  other than `in_memory`, `text.verbosity` other than `medium` (both echoed: `verbosity`
  `medium` always).

Response: `{"id": "resp_...", "object": "response", "created_at", "status", "output", "usage",
...}` with the request's parameters echoed (`temperature`/`top_p` as applied). `status` is
`completed`, or `incomplete` (`incomplete_details.reason: "max_output_tokens"`) when the output
reached max_output_tokens. `output`: a `reasoning` item first when the model thought (`rs_<hex>`, `summary: []`, one
`reasoning_text` part: chat's reasoning_content), then a `message` item (`msg_<hex>`, one
`output_text` part) or, when chat recognises calls in the output, one `function_call` item per
call (`fc_<hex>`,
`call_id` `call_<hex>`, `arguments` as the model wrote them). In an incomplete response the
item cut short is `incomplete`, those before it `completed`; a call forced to one function is
that function's item from the first token, so one cut before the model wrote the name is still
there (`arguments: ""`; `girandole.api.messages.blocks`). `usage`: `input_tokens`
(`input_tokens_details.cached_tokens`; `cache_write_tokens` 0: no cache write is billed here),
`output_tokens`, `total_tokens`, and the same counts as
Fireworks names them (`prompt_tokens`, `completion_tokens`); `output_tokens_details.
reasoning_tokens` as chat counts them.

Streaming (`stream: true`): named SSE events, each with `sequence_number` from 0:
`response.created`, `response.in_progress`; per reasoning item `response.output_item.added`,
`response.content_part.added`, `response.reasoning_text.delta`..., `response.reasoning_text.done`,
`response.content_part.done`, `response.output_item.done`; per text item `response.output_item.added`,
`response.content_part.added`, `response.output_text.delta`..., `response.output_text.done`,
`response.content_part.done`, `response.output_item.done`; per call `response.output_item.added`,
`response.function_call_arguments.delta`..., `response.function_call_arguments.done`,
`response.output_item.done` (the item's status as in the final response); MCP items with
OpenAI's `response.mcp_list_tools.*`, `response.mcp_call_arguments.*` and `response.mcp_call.*`
events (`mcp.py`); then
`response.completed` with the whole response, whatever its status (an incomplete one too:
OpenAI sends `response.incomplete` there, but the openai SDK's stream helper (3.63) keeps its
final response only from `response.completed`: `get_final_response()` raises on a stream that
ends otherwise, `until_done()` does not). An error
after the stream began is an `error` event (`code`, `message`, `param`). A stored streamed
response is saved when it completes.

Size: streamed or not, a response is held whole (`response.completed` carries it all), so one
growing past `--max-response-bytes` (text and logprobs of all its rounds, and what its MCP
servers answered: tool lists, calls' results) is a 400 naming the limit, `max_output_tokens` and
`top_logprobs` (and `max_tool_calls` when an MCP answer took it past), its generation stopped
(streamed: that `error` event, no `response.completed`); it is not stored. A background one ends `failed`, `output: []`
(`girandole.api.serving.response_size`).

Stored responses (`route.py`; the key's account only, an open server's shared): `GET
/v1/responses/{id}`, `DELETE /v1/responses/{id}` (`{"id", "object": "response.deleted",
"deleted": true}`), `GET /v1/responses?limit&after&before` (newest first: `{"object": "list",
"data", "first_id", "last_id", "has_more"}`, limit 1-100, default 20) and `GET
/v1/responses/{id}/input_items?limit&after&before&order` (the conversation's input items, earlier
turns included, `desc` by default), and for background responses `POST
/v1/responses/{id}/cancel` and `GET /v1/responses/{id}?stream=true&starting_after=N`. Kept until
deleted. An unknown id is a 404.
"""
