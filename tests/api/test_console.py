"""First contact at a terminal: readable logs at a terminal and JSON lines elsewhere, the start-up
banner (URL, model, deployment, keys, a curl line that works), and `serve --model org/name`."""

from __future__ import annotations

import json
import logging
import os
import pty
import select
import signal
import subprocess
import sys
import time

import httpx
import pytest
from api_helpers import ROOT, api_conftest
from loopback import free_port

from girandole.api.banner import Banner, client_url
from girandole.api.textlog import TextFormatter, choose_log_format

start_server = api_conftest().start_server
stop_server = api_conftest().stop_server

REPO = "tiny-org/tiny-llama"
MODEL = "accounts/testing/models/tiny"
DEPLOYMENT = "accounts/testing/deployments/tiny-dep"
KEY = "sk-console-test"


# -- the choice of format, and the text lines ------------------------------------------------


def test_auto_is_text_at_a_terminal_and_json_elsewhere(tmp_path):
    master, slave = os.openpty()
    with open(slave, "w") as tty, open(tmp_path / "log", "w") as file:
        assert choose_log_format("auto", tty) == "text"
        assert choose_log_format("auto", file) == "json"
        read, write = os.pipe()
        with open(write, "w") as pipe:
            assert choose_log_format("auto", pipe) == "json"
        os.close(read)
        for stream in (tty, file):
            assert choose_log_format("json", stream) == "json"
            assert choose_log_format("text", stream) == "text"
    os.close(master)
    with pytest.raises(ValueError, match="log format must be one of"):
        choose_log_format("yaml", sys.stderr)


def test_text_line_of_an_access_record():
    record = logging.LogRecord("girandole.access", logging.INFO, __file__, 1, "%s %s %d",
                               ("POST", "/v1/completions", 200), None)  # fmt: skip
    record.fields = {"request_id": "cmpl-1", "duration_ms": 41.3, "prompt_tokens": 5,
                     "cached_tokens": 0, "completion_tokens": 16, "ttft_ms": 12.0,
                     "key_id": "k1", "aborted": False}  # fmt: skip
    line = TextFormatter().format(record)
    assert line.endswith(
        " INFO  POST /v1/completions 200 in 41.3 ms, 5+16 tokens, ttft 12.0 ms, key k1  [req cmpl-1]"
    )
    warning = logging.LogRecord("girandole.model", logging.WARNING, __file__, 1, "odd", (), None)
    assert TextFormatter().format(warning).endswith(" WARNING odd")
    warning.name = "transformers"
    assert TextFormatter().format(warning).endswith(" WARNING odd  (transformers)")
    assert "\033[33m" in TextFormatter(color=True).format(warning)


# -- the banner ------------------------------------------------------------------------------


def test_client_url_reaches_wildcard_binds_through_loopback():
    assert client_url("0.0.0.0", 80) == "http://127.0.0.1:80"
    assert client_url("::", 80) == "http://[::1]:80"
    assert client_url("::1", 80) == "http://[::1]:80"
    assert client_url("10.1.2.3", 8000) == "http://10.1.2.3:8000"
    assert client_url("example.internal", 8000) == "http://example.internal:8000"


@pytest.mark.parametrize("keys", [True, False])
def test_banner_text(keys):
    banner = Banner("http://127.0.0.1:8000", MODEL, DEPLOYMENT, "from /m.gguf", keys, "loading")
    text = banner.text()
    assert text.splitlines()[0].endswith(" listening on http://127.0.0.1:8000")
    for fact in (MODEL, DEPLOYMENT, "from /m.gguf", "loading the model in the background"):
        assert fact in text
    assert banner.curl() in text
    assert ("Authorization: Bearer $API_KEY" in banner.curl()) == keys
    assert ('API keys    required: send "Authorization: Bearer <key>"' in text) == keys
    assert ("none: the server is open to anyone on this machine" in text) == (not keys)
    for bind, who in (("0.0.0.0", "anyone who can reach this machine (it listens on every"),
                      ("::", "anyone who can reach this machine (it listens on every"),
                      ("localhost", "anyone on this machine"),
                      ("10.1.2.3", "anyone who can reach 10.1.2.3")):  # fmt: skip
        opened = Banner(client_url(bind, 80), MODEL, DEPLOYMENT, "x", False, "ready", bind)
        assert f"API keys    none: the server is open to {who}" in opened.text()
    ready = Banner(banner.url, MODEL, DEPLOYMENT, "x", keys, "ready")
    assert "  status      ready\n" in ready.text()


def run_curl(line: str, **env: str) -> dict:
    """Run a banner's curl line in a shell, as a user pasting it would."""
    assert line.startswith("curl ")
    done = subprocess.run(["bash", "-c", line + " -sS --max-time 120"], capture_output=True,
                          text=True, timeout=150, env={**os.environ, **env})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# -- real servers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_server(hub_cache, tmp_path_factory):
    """`serve --model tiny-org/tiny-llama --revision v1` from the laid-out cache, offline, with a
    key, its stderr a file (not a terminal): JSON lines."""
    tmp = tmp_path_factory.mktemp("hub-server")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in hub_cache.env(GIRANDOLE_CACHE_DIR=str(tmp / "cache")).items():
            mp.setenv(name, value)
        srv = start_server(
            tmp, "--model", REPO, "--revision", "v1", "--api-key", KEY, "--account", "testing",
            "--model-id", "tiny", "--deployment-id", "tiny-dep", "--kv-cache-gb", "0.01",
            api_key=KEY,
        )  # fmt: skip
    yield srv
    stop_server(srv)


def log_lines(server) -> list[dict]:
    lines = [line for line in server.log().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is JSON (stderr is no terminal)


def test_served_by_repo_id_at_its_revision(hub_server, hub_cache):
    from girandole import LLM, SamplingParams

    models = httpx.get(hub_server.url + "/v1/models", headers=hub_server.headers).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    r = httpx.post(hub_server.url + "/v1/completions", json=body, headers=hub_server.headers,
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    for ref in ("v1", "main"):
        llm = LLM(model=str(hub_cache.sources[f"{REPO}@{ref}"]), kv_cache_gb=0.01)
        ref_text = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=8))
        assert (r.json()["choices"][0]["text"] == ref_text[0].text) == (ref == "v1")


def test_json_banner_and_its_curl_line(hub_server):
    (banner,) = [line for line in log_lines(hub_server) if "curl" in line]
    assert banner["message"] == f"listening on {hub_server.url}"
    assert banner["url"] == hub_server.url
    assert banner["model"] == MODEL and banner["deployment"] == DEPLOYMENT
    assert banner["keys_required"] is True
    assert banner["source"] == f"{REPO} at revision v1, from the Hugging Face cache"
    assert banner["status"] in ("loading", "ready")
    # The progress thread logs "ready" within a quarter second of the model being served (a
    # request may be answered first): wait for the line rather than race it.
    deadline = time.monotonic() + 30
    while not any(
        line["message"].startswith(f"model {MODEL} ready in") for line in log_lines(hub_server)
    ):
        assert time.monotonic() < deadline, "no 'ready' line in the log"
        time.sleep(0.1)
    out = run_curl(banner["curl"], API_KEY=KEY)
    # sampled (the curl line sets no temperature): a random tiny model may meet EOS before 32
    assert out["model"] == MODEL and 0 < out["usage"]["completion_tokens"] <= 32
    assert out["choices"][0]["finish_reason"] in ("length", "stop")
    refused = run_curl(banner["curl"], API_KEY="sk-wrong")
    assert "error" in refused


def test_serve_errors_name_the_repo(hub_cache):
    def serve(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "girandole.cli", "serve", "--port", "0", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env=hub_cache.env())  # fmt: skip

    missing = serve("--model", "tiny-org/missing")
    assert missing.returncode == 2
    assert missing.stderr.splitlines()[-1].startswith(
        "girandole serve: model tiny-org/missing is neither a local path nor in the Hugging Face cache"
    )
    revision = serve("--model", REPO, "--revision", "v9")
    assert revision.returncode == 2
    assert (
        f"model {REPO} (revision v9) is neither a local path nor in the Hugging Face cache"
        in revision.stderr
    )


def test_serve_switch_variables_read_false_as_false(monkeypatch):
    """GIRANDOLE_ALLOWED_CREDENTIALS=false (any text but 0) turned credentials on, and so for
    GIRANDOLE_ENFORCE_EAGER and GIRANDOLE_NO_OVERLAP_SCHEDULING; yes/no words are read as such
    and another word is an error naming the variable."""
    import argparse

    from girandole.api.server import add_serve_parser, settings_from_args

    def parse(*argv: str):
        parser = argparse.ArgumentParser()
        add_serve_parser(parser.add_subparsers())
        return settings_from_args(parser.parse_args(["serve", *argv]))

    names = ("ALLOWED_CREDENTIALS", "ENFORCE_EAGER", "NO_OVERLAP_SCHEDULING", "INT8_PROMPTS")
    for word, on in [("false", False), ("No", False), ("off", False), ("true", True), ("1", True)]:
        for name in names:
            monkeypatch.setenv(f"GIRANDOLE_{name}", word)
        s = parse()
        assert (s.allowed_credentials, s.enforce_eager, s.overlap_scheduling, s.int8_prompts) == (
            on, on, False if on else None, on,
        )  # fmt: skip
    for name in names:
        monkeypatch.delenv(f"GIRANDOLE_{name}")
    on = parse(
        "--allowed-credentials", "--enforce-eager", "--no-overlap-scheduling", "--int8-prompts"
    )
    assert (on.allowed_credentials, on.enforce_eager, on.overlap_scheduling) == (True, True, False)
    assert on.int8_prompts and not parse().int8_prompts
    monkeypatch.setenv("GIRANDOLE_ALLOWED_CREDENTIALS", "maybe")
    with pytest.raises(SystemExit, match="GIRANDOLE_ALLOWED_CREDENTIALS must be one of 1, true"):
        parse()
    assert parse("--allowed-credentials", "--no-evaluator-code").evaluator_code is False
    monkeypatch.setenv("GIRANDOLE_NO_EVALUATOR_CODE", "no")
    assert parse("--allowed-credentials").evaluator_code is True
    monkeypatch.setenv("GIRANDOLE_NO_EVALUATOR_CODE", "yes")
    assert parse("--allowed-credentials").evaluator_code is False


def test_evaluator_limits_from_flags_and_variables(monkeypatch):
    """--evaluator-timeout, --evaluator-memory and --max-evaluator-processes (and their
    GIRANDOLE_* variables) set the settings; without them, 30 s, 2048 MiB and 4."""
    import argparse

    from girandole.api.server import add_serve_parser, settings_from_args

    def parse(*argv: str):
        parser = argparse.ArgumentParser()
        add_serve_parser(parser.add_subparsers())
        s = settings_from_args(parser.parse_args(["serve", *argv]))
        return s.evaluator_timeout, s.evaluator_memory, s.max_evaluator_processes

    assert parse() == (30.0, 2048, 4)
    flags = ("--evaluator-timeout", "2.5", "--evaluator-memory", "512")
    assert parse(*flags, "--max-evaluator-processes", "1") == (2.5, 512, 1)
    monkeypatch.setenv("GIRANDOLE_EVALUATOR_TIMEOUT", "90")
    monkeypatch.setenv("GIRANDOLE_EVALUATOR_MEMORY", "4096")
    monkeypatch.setenv("GIRANDOLE_MAX_EVALUATOR_PROCESSES", "8")
    assert parse() == (90.0, 4096, 8)


def test_log_level_is_read_in_any_case(monkeypatch):
    """GIRANDOLE_LOG_LEVEL=INFO (or --log-level DEBUG) means info, as logging reads it; a word
    that is no level is still an error (test_serve_bad_values_are_usage_errors)."""
    import argparse

    from girandole.api.server import add_serve_parser, settings_from_args

    def parse(*argv: str):
        parser = argparse.ArgumentParser()
        add_serve_parser(parser.add_subparsers())
        return settings_from_args(parser.parse_args(["serve", *argv]))

    monkeypatch.setenv("GIRANDOLE_LOG_LEVEL", "INFO")
    assert parse().log_level == "info"
    assert parse("--log-level", "DEBUG").log_level == "debug"


def test_readme_names_every_serve_flag_with_its_variable_and_default():
    """The README (or a docs/ page) names every `girandole serve` flag (--log-level was in
    none), a flag that README pairs with a variable (`--host` (`GIRANDOLE_HOST`...) takes that
    variable, and a default README gives in parentheses (`--queue-timeout` (30 s)) is the
    settings' default."""
    import argparse
    import re

    from girandole.api.server import add_serve_parser
    from girandole.api.settings import ServerSettings

    parser = argparse.ArgumentParser()
    serve = add_serve_parser(parser.add_subparsers())
    helps = {
        opt: a.help or ""
        for a in serve._actions
        for opt in a.option_strings
        if opt.startswith("--") and opt != "--help"
    }
    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text())
    docs = readme + " ".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    assert [f for f in helps if not re.search(re.escape(f) + "(?![a-z-])", docs)] == []
    pairs = re.findall(r"`(--[a-z-]+)`,? \(?(?:repeatable; )?`(GIRANDOLE_[A-Z_]+)`", readme)
    assert len(pairs) >= 8
    assert [(f, v) for f, v in pairs if f"[{v}" not in helps[f]] == []
    settings = ServerSettings()
    defaults = re.findall(r"`(--[a-z-]+)` \(([0-9.]+)(?: s)?[),;:]", readme)
    assert len(defaults) >= 10
    wrong = [
        (f, d)
        for f, d in defaults
        if f in helps and float(d) != getattr(settings, f[2:].replace("-", "_"))
    ]
    assert wrong == []


def _subcommands(parser) -> dict:
    import argparse

    return {
        name: sub
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, sub in action.choices.items()
    }


def test_the_help_line_names_every_command():
    # `girandole --help` said `... sftj | dpoj` after rftj and rlorj had been added
    from girandole.cli import build_parser

    parser = build_parser()
    named = parser.description.split("`")[1].replace("\n", " ").split()
    assert sorted(set(named) - {"girandole", "|"}) == sorted(_subcommands(parser))


def test_docs_name_every_cli_flag_and_only_real_ones():
    """Every flag of every `girandole` subcommand (not only serve's) is named in README or a
    docs/ page (`generate --seed`, `batch create --job-id`, `deployment create --description`
    were in none), and a flag written after `girandole <command> [<sub>]` in them is one that
    command takes (`girandole deployment get|undelete` checks both)."""
    import re

    from girandole.cli import build_parser

    commands = _subcommands(build_parser())
    flags = {
        f"{name} {sub_name}".strip(): {o for a in parser._actions for o in a.option_strings}
        for name, command in commands.items()
        for sub_name, parser in [("", command), *_subcommands(command).items()]
    }
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    docs = " ".join(p.read_text() for p in texts)
    every = {f for opts in flags.values() for f in opts if f.startswith("--") and f != "--help"}
    assert sorted(f for f in every if not re.search(re.escape(f) + "(?![a-z-])", docs)) == []
    checked, wrong = 0, []
    for path in texts:
        text = path.read_text().replace("\\\n", " ")
        for span in re.findall(r"`([^`\n]+)`", text) + text.splitlines():
            for m in re.finditer(r"girandole ([a-z]+)((?: [a-z|]+)?)([^#`]*)", span):
                name, subs, rest = m.group(1), m.group(2).strip(), m.group(3)
                if name not in commands:
                    continue
                named = [f"{name} {s}" for s in subs.split("|") if f"{name} {s}" in flags]
                for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
                    checked += 1
                    wrong += [(path.name, c, flag) for c in named or [name] if flag not in flags[c]]
    assert checked >= 40
    assert wrong == []


def test_documented_curl_commands_send_their_json_as_json():
    """A body is read only as application/json (else 415), and curl -d without a Content-Type
    sends a form: README's LoRA example did so and got the 415. Every curl command in README
    and docs/*.md that sends a body names the JSON type."""
    import re

    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    commands = [
        (path.name, cmd)
        for path in texts
        for cmd in re.findall(r"curl (?:[^\n]*\\\n)*[^\n]*", path.read_text())
        if re.search(r" (-d|--data[a-z-]*) ", cmd)
    ]
    assert len(commands) >= 2
    assert [c for c in commands if "Content-Type: application/json" not in c[1]] == []


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        ([], {"GIRANDOLE_PORT": "abc"}, "argument --port: 'abc' is not an integer from 0 to 65535"),
        (["--port", "-1"], {}, "argument --port: '-1'"),
        (["--max-num-seqs", "0"], {}, "argument --max-num-seqs: '0' is not an integer >= 1"),
        ([], {"GIRANDOLE_KV_CACHE_GB": "-1"}, "[GIRANDOLE_KV_CACHE_GB]"),
        (["--mcp-timeout", "nan"], {}, "argument --mcp-timeout: 'nan' is not a number > 0"),
        ([], {"GIRANDOLE_QUEUE_TIMEOUT": "x"}, "[GIRANDOLE_QUEUE_TIMEOUT]"),
        (["--max-keys-per-user", "-1"], {}, "'-1' is not an integer >= 0"),
        (["--max-pending-finetune-jobs", "-1"], {}, "--max-pending-finetune-jobs: '-1' is not"),
        (["--evaluator-timeout", "0"], {}, "argument --evaluator-timeout: '0' is not a number > 0"),
        ([], {"GIRANDOLE_EVALUATOR_MEMORY": "64"}, "'64' is not an integer >= 128 [GIRANDOLE_EVA"),
        (["--max-evaluator-processes", "0"], {}, "--max-evaluator-processes: '0' is not an"),
        ([], {"GIRANDOLE_MAX_RLOR_TRAINERS": "0"}, "'0' is not an integer >= 1 [GIRANDOLE_MAX_R"),
        ([], {"GIRANDOLE_LOG_LEVEL": "loud"}, "--log-level must be one of critical"),
        (["--draft-model", "d", "--ngram-speculation-length", "2"], {}, "mutually exclusive"),
        ([], {"GIRANDOLE_ENFORCE_EAGER": "fals"}, "GIRANDOLE_ENFORCE_EAGER must be one of"),
        ([], {"GIRANDOLE_INT8_PROMPTS": "int8"}, "GIRANDOLE_INT8_PROMPTS must be one of"),
        ([], {"GIRANDOLE_AMX": "of"}, "GIRANDOLE_AMX must be one of 1, true, yes, on, 0"),
        (["--api-key", ""], {}, "--api-key is empty"),
        (["--threads", "0"], {}, "GIRANDOLE_THREADS must be a whole number >= 1 or auto, not '0'"),
        ([], {"GIRANDOLE_THREADS": "two"}, "GIRANDOLE_THREADS must be a whole number >= 1 or auto"),
    ],
)
def test_serve_bad_values_are_usage_errors(argv, env, named):
    """A bad flag or GIRANDOLE_* value ends `girandole serve` at once with one line naming it
    and exit 2 (a variable's value was a traceback as the parser was built; a range or a
    choice of a variable went unchecked to a failure later; conflicts exited 1)."""
    cmd = [sys.executable, "-m", "girandole.cli", "serve", "--model", "/nonexistent", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, **env})  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith("girandole serve: error: ")
    assert named in done.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "usage", "error"),
    [
        (["serve", "--prot", "9"], "usage: girandole serve [options]  (--help lists them)",
         "girandole serve: error: unrecognized arguments: --prot 9 (did you mean --port?)"),
        (["serve", "--bogus"], "usage: girandole serve [options]  (--help lists them)",
         "girandole serve: error: unrecognized arguments: --bogus"),
        (["deployment", "create", "m", "--min-replicas", "2"], "usage: girandole deployment create",
         "girandole deployment create: error: unrecognized arguments: --min-replicas 2"
         " (did you mean --min-replica-count?)"),
        (["generate", "hi", "there"], "usage: girandole generate",
         "girandole generate: error: unrecognized arguments: there"),
    ],
)  # fmt: skip
def test_an_unknown_flag_is_refused_by_its_subcommand(argv, usage, error):
    """argparse refused a flag a subcommand does not know under the top-level usage
    (`girandole [-h] {generate,...} ...`) and as `girandole: error`; `serve`'s own usage, the
    flags' 40 lines, buried any error of it. Now the subcommand's usage and name, a likely flag,
    and one usage line for serve (`--help` lists the flags)."""
    cmd = [sys.executable, "-m", "girandole.cli", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith(usage) and lines[-1] == error, done.stderr
    if argv[0] == "serve":
        assert len(lines) == 2


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [("--max-tokens", "-1", "max_tokens"), ("--top-p", "2", "top_p"), ("--top-k", "-5", "top_k")],
)
def test_generate_bad_sampling_values_are_usage_errors(flag, value, named):
    """`girandole generate` checks its sampling flags before loading the model: one line, exit 2
    (they were a ValueError traceback, exit 1, once the model had loaded)."""
    cmd = [sys.executable, "-m", "girandole.cli", "generate", "hi", "--model", "/nonexistent",
           flag, value]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"girandole generate: error: {named} must be")
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["keys", "list", "--data-dir", "{file}"], "argument --data-dir: '{file}' is not a folder"),
        (
            ["usage", "--data-dir", "{file}/sub"],
            "argument --data-dir: '{file}/sub' is not a folder",
        ),
        (["models", "list", "--data-dir", "{file}"], "argument --data-dir"),
        (["serve", "--data-dir", "{file}"], "argument --data-dir"),
        (["deployment", "list", "--base-url", "notaurl"], "argument --base-url: 'notaurl' is not"),
        (["lora", "list", "--base-url", "http://[::1"], "argument --base-url"),
        (["batch", "list", "--base-url", "http://127.0.0.1:x"], "argument --base-url"),
        (["batch", "create", "f", "--model", "m", "--wait-timeout", "nan"], "--wait-timeout"),
        (["deployment", "create", "m", "--wait-timeout", "-1"], "argument --wait-timeout: '-1'"),
        (["GIRANDOLE_CACHE_DIR", "keys", "list"], "'{file}' is a file) [GIRANDOLE_CACHE_DIR]"),
    ],
)
def test_a_file_as_data_dir_or_a_bad_base_url_is_a_usage_error(tmp_path, argv, named):
    """A file given as --data-dir was a NotADirectoryError traceback (keys, usage, models); a
    --base-url that is no URL was 'cannot reach the server' (exit 1) or an httpx traceback; a
    file as GIRANDOLE_CACHE_DIR was a FileExistsError traceback in every subcommand; a
    --wait-timeout of nan waited for ever."""
    file = tmp_path / "a-file"
    file.write_text("")
    env = {**os.environ}
    if argv[0] == "GIRANDOLE_CACHE_DIR":
        env["GIRANDOLE_CACHE_DIR"], argv = str(file), argv[1:]
    argv = [a.replace("{file}", str(file)) for a in argv]
    cmd = [sys.executable, "-m", "girandole.cli", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert named.replace("{file}", str(file)) in done.stderr.splitlines()[-1]


def test_serve_on_a_port_in_use_is_a_usage_error():
    """A port another process listens on ends start-up before the model loads, naming the
    address (it was uvicorn's JSON log line and exit 3 once the model had been resolved)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "girandole.cli", "serve", "--port", str(port),
               "--model", "/nonexistent"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"girandole serve: cannot listen on 127.0.0.1:{port} (--host, --port):"
        " Address already in use"
    )


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--draft-model", "{tmp}/missing"], "--draft-model: model path does not exist"),
        (["--deployment-id", "Bad_Dep"], "deployment id 'Bad_Dep' is not a valid Fireworks id"),
    ],
)
def test_serve_checks_draft_model_and_deployment_id_before_starting(
    tiny_llama_dir, tmp_path, flags, line
):
    """A missing --draft-model (the server started, then its load failed: exit 1) and a bad
    --deployment-id (served under a name no request could use) end start-up: one line, exit 2."""
    cmd = [sys.executable, "-m", "girandole.cli", "serve", "--port", "0", "--model",
           str(tiny_llama_dir), "--data-dir", str(tmp_path),
           *(f.replace("{tmp}", str(tmp_path)) for f in flags)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"girandole serve: {line}")


def test_serve_at_a_terminal_prints_text_and_the_banner(hub_cache, tmp_path):
    """`girandole serve` with its stderr a terminal (a pty): readable lines, the banner block,
    then the ready line; the banner's curl line (an open server: no key) answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "girandole.cli", "serve", "--port", str(port), "--model", REPO,
           "--kv-cache-gb", "0.01", "--data-dir", str(tmp_path / "data")]  # fmt: skip
    env = hub_cache.env(GIRANDOLE_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    env.pop("GIRANDOLE_LOG_FORMAT", None)
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env,
                            cwd=ROOT)  # fmt: skip
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 300
        while b" ready in " not in out:
            assert time.monotonic() < deadline and proc.poll() is None, out.decode(errors="replace")
            if select.select([master], [], [], 0.5)[0]:
                try:
                    out += os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
        text = out.decode(errors="replace").replace("\r\n", "\n")
        lines = text.splitlines()
        assert not any(line.lstrip().startswith("{") for line in lines), text
        start = next(i for i, line in enumerate(lines) if " listening on " in line)
        block = "\n".join(lines[start : start + 8])
        assert f"listening on http://127.0.0.1:{port}" in block
        assert "accounts/fireworks/models/tiny-llama" in block  # --model-id from the repo id
        assert "accounts/fireworks/deployments/tiny-llama" in block
        assert f"{REPO}, from the Hugging Face cache" in block
        assert "none: the server is open to anyone on this machine" in block
        assert any(line.endswith(" INFO  Application startup complete.") for line in lines)
        curl = next(line for line in lines if line.startswith("  try ")).split(None, 1)[1]
        assert "Authorization" not in curl
        assert 0 < run_curl(curl)["usage"]["completion_tokens"] <= 32  # sampled: EOS may come
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        os.close(master)
