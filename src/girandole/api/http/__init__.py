"""HTTP plumbing: errors, request bodies and their validation, unsupported fields, SSE,
client disconnects, the OpenAPI document, bearer keys, and the schema pieces both endpoints share."""
