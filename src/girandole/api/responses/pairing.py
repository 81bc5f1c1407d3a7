"""OpenAI's rule for function calls in a Responses conversation (the stored turns of
`previous_response_id` and the new input together): every `function_call_output` answers an
earlier `function_call` of the same `call_id`, and every `function_call` is answered. OpenAI
answers 400 otherwise; without the check a dangling output reached the model as a result of a
call nobody made (or the chat template refused it with an unrelated message), and an
unanswered call as if it had been answered."""

from __future__ import annotations

from typing import Any

from girandole.api.http.errors import bad_request


def check_call_outputs(items: list[dict[str, Any]]) -> None:
    """A 400 in OpenAI's words for an output without its call, or a call without its output.
    Each output answers one call still waiting for it: a second output of one call, or a second
    call of a `call_id` still unanswered (the one output then read as both calls' result, the
    other call unanswered), is a 400 too. A `call_id` reused once its call was answered (agents
    that number their calls per turn) pairs as before."""
    waiting: list[str] = []  # the calls not answered yet, in order
    for item in items:
        kind = item.get("type", "message")
        if kind == "function_call":
            if item["call_id"] in waiting:
                raise bad_request(
                    f"Duplicate function call with call_id {item['call_id']}: an earlier call of"
                    " this call_id has no output yet.",
                    "input",
                )
            waiting.append(item["call_id"])
        elif kind == "function_call_output":
            if item["call_id"] not in waiting:
                raise bad_request(
                    f"No tool call found for function call output with call_id {item['call_id']}.",
                    "input",
                )
            waiting.remove(item["call_id"])
    if waiting:
        raise bad_request(f"No tool output found for function call {waiting[0]}.", "input")
