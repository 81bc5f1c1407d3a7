"""POST /v1/responses (also under /inference/v1): OpenAI's Responses API on the chat pipeline,
with stored responses (`GET`/`DELETE /v1/responses/{id}`, `GET /v1/responses`,
`GET /v1/responses/{id}/input_items`). Point the openai SDK at `base_url=".../inference/v1"`.
"""
