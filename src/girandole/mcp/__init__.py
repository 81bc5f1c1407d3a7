"""Remote MCP servers (the Model Context Protocol) as a client: the tools of OpenAI Responses'
`mcp` (and Fireworks' `sse`) tool entries, listed and called by the server (`client.py`)."""
