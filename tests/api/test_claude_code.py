"""Claude Code (Anthropic's coding agent, the npm package, pinned) against the real server and
default model, as Fireworks documents it: `ANTHROPIC_BASE_URL=<server>/inference`. Its requests
carry what plain SDK calls do not: system messages inside the conversation, `context_management`
edits, `thinking: adaptive`, `output_config.effort` (on a model that cannot think), tools,
streamed; and a cut answer makes it ask again ("Output token limit hit. Resume"), a conversation
of system, assistant and user turns. Each of those was a 400 here before; now every request it
makes is a 200 in the server's usage rows, which add up to the usage it reports."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from api_helpers import ACCOUNT, MODEL, ROOT, npm_install

from girandole.registry.keystore import Database

pytestmark = pytest.mark.slow

PACKAGE = ROOT / "tests" / "claude_code"


def claude_binary() -> Path:
    """`claude`, installed from npm into tests/claude_code once (about 240 MB, 30-60 s)."""
    binary = PACKAGE / "node_modules" / ".bin" / "claude"
    if not binary.exists():
        npm_install(PACKAGE, "Claude Code")
    return binary


def test_claude_code_runs_a_prompt(server, tmp_path):
    claude = claude_binary()
    data = server.log_path.parent / f"data-{server.port}"
    key, info = Database.in_folder(data).create_key(ACCOUNT, name="claude-code")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),  # its settings and session files: never the user's
        "ANTHROPIC_BASE_URL": server.url + "/inference",
        "ANTHROPIC_API_KEY": key,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",  # nothing sent elsewhere
        "DISABLE_AUTOUPDATER": "1",
        # the base model rarely ends a turn: short answers keep its "Resume" retries quick
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "16",
    }
    # its own system prompt (19k tokens, a minute of prefill on this CPU) and tool set (24)
    # replaced by short ones: the requests keep their shape, two tools (Agent's brings the
    # system message inside the conversation)
    done = subprocess.run(
        [str(claude), "-p", "Say hi", "--model", MODEL, "--max-turns", "1",
         "--output-format", "json", "--system-prompt", "You are terse.", "--tools", "Agent,Read"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    result = json.loads(done.stdout)
    assert result["type"] == "result" and result["api_error_status"] is None, result
    if not result["is_error"]:
        assert done.returncode == 0 and result["result"].strip(), result  # the model's words
    elif result["subtype"] != "error_max_turns":  # its last turn called a tool: no more turns
        # an answer the base model never ended, asked to resume 3 times
        assert "exceeded the 16 output token maximum" in result["result"], result
    with sqlite3.connect(data / "girandole.db") as conn:
        rows = conn.execute(
            "SELECT endpoint, status, stream, prompt_tokens, completion_tokens FROM usage"
            " WHERE key_id = ?", (info.id,),
        ).fetchall()  # fmt: skip
    assert rows and all(r[:3] == ("messages", 200, 1) for r in rows), rows
    assert sum(r[3] for r in rows) == result["usage"]["input_tokens"]
    assert sum(r[4] for r in rows) == result["usage"]["output_tokens"]
