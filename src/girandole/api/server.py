"""`girandole serve`: the HTTP server on uvicorn (uvloop + httptools).

The socket opens at once; the model loads in a thread meanwhile (a progress line on stderr,
/health 503 until it is ready, then 200).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time

from girandole.api.flag_values import (
    ENV_PREFIX,
    env_default,
    float_value,
    int_value,
    switch_value,
)
from girandole.api.ops.webhooks import check_url, secret_key
from girandole.api.settings import ServerSettings
from girandole.env_switches import check_engine_switches, threads_setting
from girandole.model.default import DEFAULT_MODEL_ID

logger = logging.getLogger("girandole.api")


# engine/kv_groups.KV_CACHE_DTYPES' names (not imported: the engine pulls in torch)
KV_CACHE_DTYPE_CHOICES = ("auto", "float32", "float16")
# The flags with choices whose GIRANDOLE_* variable (the flag's name) is checked after parsing
ENV_CHOICES: dict[str, tuple[str, ...]] = {
    "kv_cache_dtype": KV_CACHE_DTYPE_CHOICES,
    "stream_usage": ("separate", "finish"),
    "prompt_cache_scope": ("account", "key", "server"),
    "log_level": ("critical", "error", "warning", "info", "debug"),
    "log_format": ("auto", "json", "text"),
    "ray_router": ("prefix", "round_robin", "least_loaded"),
}


def _env(name: str, default=None):
    return os.environ.get(ENV_PREFIX + name, default)


def _env_list(name: str) -> list[str]:
    value = _env(name)
    return [k.strip() for k in value.split(",") if k.strip()] if value else []


def _threads_value(text: str) -> int | None:
    """An argparse type for --threads: a whole number >= 1 or auto."""
    try:
        return threads_setting(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve the Fireworks-compatible inference API over HTTP",
        # the flags' usage line is 40 lines long: an error under it scrolled out of sight
        usage="%(prog)s [options]  (--help lists them)",
        description="Serve the Fireworks-compatible inference API. Every flag can also be set"
        " with the environment variable shown.",
    )
    p.add_argument(
        "--host", default=_env("HOST", "127.0.0.1"), help="bind address [GIRANDOLE_HOST]"
    )
    p.add_argument(
        "--port",
        type=int_value("PORT", 0, 65535),
        default=env_default("PORT", "8000"),
        help="0: any free port [GIRANDOLE_PORT]",
    )
    p.add_argument(
        "--model",
        default=_env("MODEL"),
        help="a .gguf file, an HF folder, or a Hugging Face repo id (org/name, or"
        " org/name:file.gguf for one of a repo's GGUF files), downloaded into the Hugging Face"
        " cache before the server starts; default: Gemma 3 270M [GIRANDOLE_MODEL]",
    )
    p.add_argument(
        "--revision",
        default=_env("REVISION"),
        help="branch, tag or commit of a repo id; default: main [GIRANDOLE_REVISION]",
    )
    p.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        default=None,
        help="accept this bearer key (repeatable); none: the server is open"
        " [GIRANDOLE_API_KEY, comma-separated]",
    )
    p.add_argument(
        "--api-keys-file",
        default=_env("API_KEYS_FILE"),
        help="file with one key a line [GIRANDOLE_API_KEYS_FILE]",
    )
    p.add_argument(
        "--account",
        default=_env("ACCOUNT", "fireworks"),
        help="account of the served model [GIRANDOLE_ACCOUNT]",
    )
    p.add_argument(
        "--prompt-cache-scope",
        choices=ENV_CHOICES["prompt_cache_scope"],
        default=env_default("PROMPT_CACHE_SCOPE", "account"),
        help="who shares the prefix cache: the keys of one account (default), each key alone,"
        " or every request on the server; prompt_cache_isolation_key divides it further"
        " [GIRANDOLE_PROMPT_CACHE_SCOPE]",
    )
    p.add_argument(
        "--model-id",
        default=_env("MODEL_ID"),
        help="served as accounts/<account>/models/<model-id>; default: from the repo id"
        " (Qwen/Qwen3-0.6B: qwen3-0-6b), else gemma-3-270m [GIRANDOLE_MODEL_ID]",
    )
    p.add_argument(
        "--deployment-id",
        default=_env("DEPLOYMENT_ID"),
        help="its deployment accounts/<account>/deployments/<id>; default: the model id"
        " [GIRANDOLE_DEPLOYMENT_ID]",
    )
    p.add_argument(
        "--kv-cache-gb",
        type=float_value("KV_CACHE_GB", 0, above=True),
        default=env_default("KV_CACHE_GB"),
        help="memory for the KV cache [GIRANDOLE_KV_CACHE_GB]",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPE_CHOICES,
        default=env_default("KV_CACHE_DTYPE", "auto"),
        help="the KV cache's element type: auto = bf16 on a GPU, float16 on a CPU with the"
        " native kernels (float32 in reference mode or without them); float32 or float16 on a"
        " CPU [GIRANDOLE_KV_CACHE_DTYPE, default auto]",
    )
    p.add_argument(
        "--max-loras",
        type=int_value("MAX_LORAS", 1),
        default=env_default("MAX_LORAS", "8"),
        help="LoRA adapters resident per engine at once; others wait, least recently used"
        " evicted [GIRANDOLE_MAX_LORAS, default 8]",
    )
    p.add_argument(
        "--max-model-len",
        type=int_value("MAX_MODEL_LEN", 1),
        default=env_default("MAX_MODEL_LEN"),
        help="cap the context length (tokens) [GIRANDOLE_MAX_MODEL_LEN]",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int_value("MAX_NUM_SEQS", 1),
        default=env_default("MAX_NUM_SEQS"),
        help="sequences (choices) the engine runs at once; more wait in its queue, batch-job"
        " lines after interactive ones [GIRANDOLE_MAX_NUM_SEQS, default 64]",
    )
    p.add_argument(
        "--target-itl-ms",
        type=float_value("TARGET_ITL_MS", 0),
        default=env_default("TARGET_ITL_MS"),
        help="while streams decode, cap each step's prompt tokens so a step takes about this"
        " long, or twice its decodes' own time if that is longer (default 100; 0: no cap)"
        " [GIRANDOLE_TARGET_ITL_MS]",
    )
    p.add_argument(
        "--ngram-speculation-length",
        type=int_value("NGRAM_SPECULATION_LENGTH", 0),
        default=env_default("NGRAM_SPECULATION_LENGTH", "0"),
        help="speculative decoding by n-gram lookup over each request's prompt and output:"
        " tokens proposed per step, 0 = off [GIRANDOLE_NGRAM_SPECULATION_LENGTH]",
    )
    p.add_argument(
        "--draft-model",
        default=_env("DRAFT_MODEL"),
        help="speculative decoding with this draft model (.gguf, HF folder or repo id), which"
        " must share the model's tokenizer [GIRANDOLE_DRAFT_MODEL]",
    )
    p.add_argument(
        "--draft-token-count",
        type=int_value("DRAFT_TOKEN_COUNT", 1),
        default=env_default("DRAFT_TOKEN_COUNT", "4"),
        help="tokens the draft model proposes per step [GIRANDOLE_DRAFT_TOKEN_COUNT]",
    )
    p.add_argument(
        "--threads",
        type=_threads_value,
        default=env_default("THREADS"),
        help="CPU threads of the engine: a number, or auto (torch's default count, fewer while"
        " other processes hold cores: engine/cpu_threads.py) [GIRANDOLE_THREADS, default auto]",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        default=env_default("ENFORCE_EAGER"),  # its text: switch_value reads it
        help="run decode steps eagerly instead of as graphs (CUDA graphs captured at start-up on"
        " a GPU; recorded native kernel calls on a CPU) [GIRANDOLE_ENFORCE_EAGER]",
    )
    p.add_argument(
        "--int8-prompts",
        action="store_true",
        default=env_default("INT8_PROMPTS"),
        help="run prompt rows on the linears' int8 kernel too, as decode rows (CPUs without"
        " AMX): faster prefill, prompt logprobs and embeddings at int8 activations' accuracy"
        " [GIRANDOLE_INT8_PROMPTS]",
    )
    p.add_argument(
        "--no-evaluator-code",
        dest="no_evaluator_code",
        action="store_const",
        const=True,
        default=env_default("NO_EVALUATOR_CODE"),
        help="refuse evaluators with Python code (they run in a child process, a crash and"
        " resource barrier but not a security boundary: docs/evaluators.md)"
        " [GIRANDOLE_NO_EVALUATOR_CODE]",
    )
    p.add_argument(
        "--no-overlap-scheduling",
        dest="overlap_scheduling",
        action="store_const",
        const=True,
        default=env_default("NO_OVERLAP_SCHEDULING"),
        help="on a GPU, postprocess each step before scheduling the next, instead of scheduling"
        " it while the step runs [GIRANDOLE_NO_OVERLAP_SCHEDULING]",
    )
    p.add_argument(
        "--chat-template",
        default=_env("CHAT_TEMPLATE"),
        help="chat template for /chat/completions: a Jinja file, a tokenizer_config.json, or a"
        " built-in family (gemma, llama3, llama2, chatml); default: the model's, else the"
        " built-in one of its family [GIRANDOLE_CHAT_TEMPLATE]",
    )
    p.add_argument(
        "--stream-usage",
        choices=ENV_CHOICES["stream_usage"],
        default=env_default("STREAM_USAGE", "separate"),
        help="where streamed usage goes: a final chunk with choices [] (Fireworks 2026, default)"
        " or on each finish chunk (2025) [GIRANDOLE_STREAM_USAGE]",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int_value("MAX_REQUEST_BYTES", 1),
        default=env_default("MAX_REQUEST_BYTES", str(16 * 1024 * 1024)),
        help="larger request bodies get 413 [GIRANDOLE_MAX_REQUEST_BYTES]",
    )
    p.add_argument(
        "--max-response-bytes",
        type=int_value("MAX_RESPONSE_BYTES", 1),
        default=env_default("MAX_RESPONSE_BYTES", str(256 * 1024 * 1024)),
        help="a whole (non-streamed) response, or a Responses API one streamed or not, growing"
        " larger is a 400, its generation stopped [GIRANDOLE_MAX_RESPONSE_BYTES]",
    )
    p.add_argument(
        "--mcp-allowed-hosts",
        default=_env("MCP_ALLOWED_HOSTS", "*"),
        metavar="HOSTS",
        help="the MCP servers a Responses request's mcp tools may name: host or host:port"
        " patterns (*.example.com), comma-separated; * any public host (loopback and private"
        " addresses must be named); an empty list turns MCP tools off"
        " [GIRANDOLE_MCP_ALLOWED_HOSTS, default *]",
    )
    p.add_argument(
        "--allow-private-image-urls",
        action="store_true",
        default=env_default("ALLOW_PRIVATE_IMAGE_URLS"),  # its text: switch_value reads it
        help="let a vision model's requests name image URLs on loopback, private, link-local or"
        " other non-public addresses (refused by default: the server would fetch them from"
        " inside its network) [GIRANDOLE_ALLOW_PRIVATE_IMAGE_URLS]",
    )
    p.add_argument(
        "--webhook-url",
        default=_env("WEBHOOK_URLS", ""),
        metavar="URLS",
        help="where to POST an event when a background response or an OpenAI batch ends"
        " (OpenAI's webhook events, signed as Standard Webhooks), comma-separated"
        " [GIRANDOLE_WEBHOOK_URLS]",
    )
    p.add_argument(
        "--webhook-secret",
        default=_env("WEBHOOK_SECRET"),
        metavar="SECRET",
        help="the key webhook events are signed with: whsec_ and base64, as OpenAI's"
        " (python -c \"import base64,os;print('whsec_'+base64.b64encode(os.urandom(32)).decode())\")"
        " [GIRANDOLE_WEBHOOK_SECRET]",
    )
    p.add_argument(
        "--mcp-timeout",
        type=float_value("MCP_TIMEOUT", 0, above=True),
        default=env_default("MCP_TIMEOUT", "60"),
        help="seconds one MCP operation (connect, list tools, one call) may take"
        " [GIRANDOLE_MCP_TIMEOUT, default 60]",
    )
    cors = p.add_argument_group(
        "CORS (browsers)",
        "as vLLM's flags; a list is comma-separated or a JSON list (vLLM's form)",
    )
    cors.add_argument(
        "--allowed-origins",
        default=_env("ALLOWED_ORIGINS", "*"),
        metavar="ORIGINS",
        help="origins whose pages may call the server (scheme://host[:port], or *); an empty"
        " list turns CORS off [GIRANDOLE_ALLOWED_ORIGINS, default *]",
    )
    cors.add_argument(
        "--allowed-credentials",
        action="store_true",
        default=env_default("ALLOWED_CREDENTIALS"),
        help="let pages send cookies and HTTP auth: the page's own origin is answered instead of"
        " * [GIRANDOLE_ALLOWED_CREDENTIALS]",
    )
    cors.add_argument(
        "--allowed-methods",
        default=_env("ALLOWED_METHODS", "*"),
        metavar="METHODS",
        help="methods a page may use [GIRANDOLE_ALLOWED_METHODS, default *]",
    )
    cors.add_argument(
        "--allowed-headers",
        default=_env("ALLOWED_HEADERS", "*"),
        metavar="HEADERS",
        help="request headers a page may send [GIRANDOLE_ALLOWED_HEADERS, default *]",
    )
    p.add_argument(
        "--log-level",
        type=str.lower,  # INFO as info, as logging itself reads it
        default=env_default("LOG_LEVEL", "info"),
        choices=ENV_CHOICES["log_level"],
        help="[GIRANDOLE_LOG_LEVEL]",
    )
    ray = p.add_argument_group("Ray Serve (ray[serve], a dependency)")
    ray.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=_env("RAY"),
        metavar="ADDRESS",
        help="run deployments (the server's own model too) as Ray Serve replicas: on the"
        " cluster at ADDRESS, or without it on a local cluster of this server's [GIRANDOLE_RAY]",
    )
    ray.add_argument(
        "--ray-router",
        default=env_default("RAY_ROUTER", "prefix"),
        choices=ENV_CHOICES["ray_router"],
        help="how requests pick a replica: the one holding the prompt's prefix (else the least"
        " loaded), each in turn, or Ray's power of two choices [GIRANDOLE_RAY_ROUTER]",
    )
    ray.add_argument(
        "--ray-replica-cpus",
        type=float_value("RAY_REPLICA_CPUS", 0),
        default=env_default("RAY_REPLICA_CPUS", "1"),
        help="Ray CPUs each replica reserves [GIRANDOLE_RAY_REPLICA_CPUS]",
    )
    ray.add_argument(
        "--ray-replicas-per-node",
        type=int_value("RAY_REPLICAS_PER_NODE", 0),
        default=env_default("RAY_REPLICAS_PER_NODE", "1"),
        help="replicas of one deployment on one node; 0: no limit (a CPU replica uses every"
        " core of its node) [GIRANDOLE_RAY_REPLICAS_PER_NODE]",
    )
    from girandole.api.ops.flags import add_ops_arguments

    add_ops_arguments(p)
    p.set_defaults(func=_cmd_serve)
    return p


def _default_model_id(model: str | None) -> str:
    """The repo's name for a repo id; gemma-3-270m for the default model and local paths."""
    from pathlib import Path

    from girandole.model.hub import model_id_of, parse_repo_model

    if model is None or Path(model).expanduser().exists():
        return DEFAULT_MODEL_ID
    try:
        ref = parse_repo_model(model)
    except ValueError:  # a bad file name: the start-up error names it
        return DEFAULT_MODEL_ID
    return model_id_of(ref) if ref is not None else DEFAULT_MODEL_ID


def check_listen(host: str, port: int) -> None:
    """OSError naming --host/--port where the server could not listen (the address is in use,
    not this machine's, or not a host name), so that start-up ends before the model loads."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"--host {host!r}: {exc.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                probe.bind(address)
            except OSError as exc:
                raise OSError(
                    f"cannot listen on {host}:{port} (--host, --port): {exc.strerror}"
                ) from None


def check_webhooks(urls: list[str], secret: str | None) -> list[str]:
    """--webhook-url: http(s) URLs, and a secret to sign with (ValueError saying what is
    wrong)."""
    for url in urls:
        check_url(url)
    if urls:
        if secret is None:
            raise ValueError("--webhook-url needs --webhook-secret (whsec_...) to sign events")
        secret_key(secret)
    return urls


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    from girandole.api.http.cors import check_origins, check_tokens, parse_list
    from girandole.api.ops.flags import ops_settings

    keys = args.api_keys if args.api_keys is not None else _env_list("API_KEY")
    if any(not key.strip() for key in keys):  # `--api-key "$KEY"` with KEY unset: not open
        raise SystemExit("--api-key is empty (a server without keys is open to anyone)")
    if args.ngram_speculation_length and args.draft_model:
        raise SystemExit("--ngram-speculation-length and --draft-model are mutually exclusive")
    for dest, choices in ENV_CHOICES.items():  # argparse checks no default's choices
        value = getattr(args, dest)
        if value not in choices:
            flag = "--" + dest.replace("_", "-")
            raise SystemExit(
                f"{flag} must be one of {', '.join(choices)}, not {value!r}"
                f" [{ENV_PREFIX}{dest.upper()}]"
            )
    try:
        origins = check_origins(parse_list(args.allowed_origins) or [])
        methods = check_tokens(
            "--allowed-methods", parse_list(args.allowed_methods) or [], upper=True
        )
        headers = check_tokens("--allowed-headers", parse_list(args.allowed_headers) or [])
        webhook_urls = check_webhooks(parse_list(args.webhook_url) or [], args.webhook_secret)
        enforce_eager = switch_value(args.enforce_eager, "ENFORCE_EAGER")
        int8_prompts = switch_value(args.int8_prompts, "INT8_PROMPTS")
        no_overlap = switch_value(args.overlap_scheduling, "NO_OVERLAP_SCHEDULING")
        credentials = switch_value(args.allowed_credentials, "ALLOWED_CREDENTIALS")
        no_evaluator_code = switch_value(args.no_evaluator_code, "NO_EVALUATOR_CODE")
        private_images = switch_value(args.allow_private_image_urls, "ALLOW_PRIVATE_IMAGE_URLS")
        check_engine_switches()  # GIRANDOLE_AMX and the like: read later, by the kernels
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return ServerSettings(
        host=args.host,
        port=args.port,
        model=args.model,
        revision=args.revision,
        api_keys=list(keys),
        api_keys_file=args.api_keys_file,
        account=args.account,
        prompt_cache_scope=args.prompt_cache_scope,
        model_id=args.model_id or _default_model_id(args.model),
        deployment_id=args.deployment_id,
        kv_cache_gb=args.kv_cache_gb,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        target_itl_ms=args.target_itl_ms,
        max_loras=args.max_loras,
        chat_template=args.chat_template,
        ngram_speculation_length=args.ngram_speculation_length,
        draft_model=args.draft_model,
        draft_token_count=args.draft_token_count,
        enforce_eager=enforce_eager,
        threads=threads_setting(args.threads),
        int8_prompts=int8_prompts,
        overlap_scheduling=False if no_overlap else None,
        max_request_bytes=args.max_request_bytes,
        max_response_bytes=args.max_response_bytes,
        stream_usage=args.stream_usage,
        allowed_origins=origins,
        allowed_credentials=credentials,
        evaluator_code=not no_evaluator_code,
        allowed_methods=methods,
        allowed_headers=headers,
        mcp_allowed_hosts=parse_list(args.mcp_allowed_hosts) or [],
        mcp_timeout=args.mcp_timeout,
        allow_private_image_urls=private_images,
        webhook_urls=webhook_urls,
        webhook_secret=args.webhook_secret,
        log_level=args.log_level,
        ray=args.ray,
        ray_router=args.ray_router,
        ray_replica_cpus=args.ray_replica_cpus,
        ray_replicas_per_node=args.ray_replicas_per_node,
        **ops_settings(args),
    )


def _show_loading(state, stop: threading.Event) -> None:
    """A progress line on stderr while the model loads."""
    from tqdm import tqdm

    bar = tqdm(
        total=None,
        desc=f"Loading {state.served.name}",
        bar_format="{desc}: {elapsed}",
        file=sys.stderr,
        disable=None,  # off when stderr is not a terminal
        leave=False,  # the "ready" log line replaces it
    )
    while state.status == "loading" and not stop.wait(0.25):
        bar.refresh()
    bar.close()
    if state.status == "ready":
        logger.info(
            "model %s ready in %.1f s (context %d tokens)",
            state.served.name,
            state.load_seconds or 0.0,
            state.served.context_length or 0,
        )


def _cmd_serve(args: argparse.Namespace) -> int:
    # the values, the port, the data folder and the model first, before the app's imports
    # (torch and the rest: seconds on a small machine): a usage error comes at once
    from girandole.api.banner import describe_source
    from girandole.api.ops.data_lock import lock_data_dir
    from girandole.api.ops.jsonlog import configure_logging
    from girandole.api.textlog import choose_log_format
    from girandole.model.default import resolve_model_path

    try:
        settings = settings_from_args(args)
    except SystemExit as exc:  # a bad value or combination: a usage error, as argparse's
        if not isinstance(exc.code, str):
            raise
        print(f"girandole serve: error: {exc.code}", file=sys.stderr)
        return 2
    if settings.ray:
        try:
            import ray.serve  # noqa: F401 - a dependency, but a platform may lack its wheel
        except ImportError:
            print(
                "girandole serve: --ray needs Ray Serve: pip install 'ray[serve]'",
                file=sys.stderr,
            )
            return 2
    log_format = choose_log_format(settings.log_format, sys.stderr)
    configure_logging(settings.log_level, log_format)
    source = describe_source(settings.model, settings.revision)
    if log_format == "json" and settings.model is not None:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # download bars would break the JSON lines (the log says it)
    try:
        check_listen(settings.host, settings.port)
        if settings.data_dir:  # before AppState, whose start-up takes over a dead server's work
            lock_data_dir(settings.data_dir)  # its descriptor stays open (held) until we exit
        if settings.model is not None:  # a repo id is downloaded here, before the socket opens
            settings.model = str(resolve_model_path(settings.model, settings.revision))
        if settings.draft_model is not None:  # else a missing one fails once the server is up
            try:
                settings.draft_model = str(resolve_model_path(settings.draft_model))
            except (ValueError, OSError) as exc:
                raise ValueError(f"--draft-model: {exc}") from None
    except (ValueError, OSError) as exc:
        print(f"girandole serve: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from girandole.api.app import create_app
    from girandole.api.banner import banner_of, bound_port
    from girandole.api.http.connections import (
        ConnectionGuard,
        default_max_connections,
        raise_open_file_limit,
    )
    from girandole.api.ops.flags import DrainingServer
    from girandole.api.state import AppState

    try:
        state = AppState(settings)
    except (ValueError, OSError) as exc:
        print(f"girandole serve: {exc}", file=sys.stderr)
        return 2
    if state.ops.open:
        logger.warning(
            "no API keys configured: the server is open to anyone who can reach %s:%d"
            " (use --api-key or --api-keys-file)",
            settings.host,
            settings.port,
        )
    else:
        logger.info(
            "%d API key(s) from flags; keys database %s", len(state.keys), state.ops.db.path
        )
    app = create_app(state, load_in_background=True)
    file_limit = raise_open_file_limit()
    guard = ConnectionGuard(
        settings.max_connections or default_max_connections(file_limit),
        settings.request_read_timeout,
        settings.response_write_timeout,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=guard.protocol_class(),  # uvicorn's httptools protocol, with the guard
        ws="none",  # no WebSocket routes: a request asking to upgrade is served as HTTP/1.1
        log_level=settings.log_level,
        log_config=None,  # configure_logging's handler (JSON lines) for uvicorn's logs too
        access_log=False,  # girandole.access logs each request, with its request id
        timeout_graceful_shutdown=settings.drain_seconds,
        # uvicorn's 5 s equalled httpx's pool expiry: a request sent on a connection idle for
        # about 5 s met the server's close ("Server disconnected without sending a response")
        timeout_keep_alive=settings.keep_alive_timeout,
    )
    server = DrainingServer(config, state)
    stop = threading.Event()

    def watch() -> None:
        while not server.started:  # the banner once the socket is open
            if stop.wait(0.05):
                return
        banner_of(state, bound_port(server, settings.port), source).announce(log_format, sys.stderr)
        _show_loading(state, stop)
        if state.status == "failed":
            logger.error("the model failed to load: %s; stopping", state.error)
            server.should_exit = True

    threading.Thread(target=watch, name="girandole-progress", daemon=True).start()
    start = time.monotonic()
    server.run()
    stop.set()
    state.ops.close()  # usage rows of requests cut off at the end of the grace period
    if state.status == "failed":
        return 1
    if state.loader is not None and state.loader.is_alive():
        # stopped while the model loads: the interpreter's exit under the loading thread, deep
        # in native code (GGUF, torch), aborted the process (SIGABRT, "terminate called without
        # an active exception") instead of the clean stop's 0. Nothing else is left to do.
        logger.info("server stopped while the model was loading")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    logger.info("server stopped after %.0f s", time.monotonic() - start)
    return 0
