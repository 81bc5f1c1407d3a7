"""Server settings: the `girandole serve` flags, each with a GIRANDOLE_* environment variable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from girandole.model.default import DEFAULT_MODEL_ID

UsagePlacement = Literal["separate", "finish"]
# Who shares the prefix cache (girandole.api.serving.cache_scope)
PromptCacheScope = Literal["account", "key", "server"]


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None  # .gguf file, HF folder or HF repo id; None = the default model
    revision: str | None = None  # of a repo id: branch, tag or commit; None = main
    api_keys: list[str] = field(default_factory=list)
    api_keys_file: str | None = None
    account: str = "fireworks"
    prompt_cache_scope: PromptCacheScope = "account"
    model_id: str = DEFAULT_MODEL_ID
    deployment_id: str | None = None  # None: same as model_id
    kv_cache_gb: float | None = None
    kv_cache_dtype: str = "auto"  # "auto", or on CPU "float32" / "float16" (engine/kv_groups.py)
    max_model_len: int | None = None  # cap on the context; None: the model's (and KV cache's)
    max_num_seqs: int | None = None  # sequences the engine runs at once; None: EngineConfig's
    target_itl_ms: float | None = None  # None: EngineConfig's; 0: no cap on prefill chunks
    max_loras: int = 8  # LoRA adapters resident per engine at once (any number may be loaded)
    chat_template: str | None = None  # --chat-template: a file, a family name or a template
    # Speculative decoding for every request (girandole.engine.speculation): n-gram lookup
    # proposing this many tokens, or a draft model with the model's tokenizer; exclusive.
    ngram_speculation_length: int = 0
    draft_model: str | None = None
    draft_token_count: int = 4
    enforce_eager: bool = False  # decode steps eager: no CUDA graphs, no CPU graphs
    threads: int | None = None  # CPU threads; None: auto (engine/cpu_threads.py)
    int8_prompts: bool = False  # prompt rows on the int8 kernel too (EngineConfig.int8_prompts)
    # GPU: schedule step N+1 while step N runs (None: on; False: --no-overlap-scheduling)
    overlap_scheduling: bool | None = None
    max_request_bytes: int = 16 * 1024 * 1024
    # a response held whole growing larger is a 400 (girandole.api.serving.response_size)
    max_response_bytes: int = 256 * 1024 * 1024
    # Where streamed usage goes: "separate" = a final chunk with `choices: []` before [DONE]
    # (Fireworks' 2026 spec); "finish" = on each choice's finish chunk (the 2025 recordings).
    stream_usage: UsagePlacement = "separate"
    # CORS, as vLLM's flags (girandole.api.http.cors): an empty origin list turns it off
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_credentials: bool = False
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    # Remote MCP servers a Responses request may name (girandole.mcp.hosts): host or host:port
    # patterns (fnmatch: "*.example.com"); "*" any public host; an empty list: MCP tools off
    mcp_allowed_hosts: list[str] = field(default_factory=lambda: ["*"])
    mcp_timeout: float = 60.0  # seconds for one MCP operation (connect, list, one call)
    # Image URLs a vision model's request names are fetched only from public addresses unless
    # this is set (girandole.api.serving.image_fetch): loopback, private, link-local... refused
    allow_private_image_urls: bool = False
    # Where events of ended background responses and batches go (girandole.api.ops.webhooks),
    # signed with the secret (whsec_<base64>)
    webhook_urls: list[str] = field(default_factory=list)
    # Evaluators with Python code (girandole.evaluators): --no-evaluator-code refuses them (403)
    evaluator_code: bool = True
    # An evaluator's child process (girandole.evaluators.runner), in builds, evaluation jobs and
    # RFT jobs: seconds it may take per row (then the row fails and the child restarts), its
    # address-space limit in MiB, and how many such children the server runs at once (builds and
    # evaluation jobs together; more wait)
    evaluator_timeout: float = 30.0
    evaluator_memory: int = 2048
    max_evaluator_processes: int = 4
    # keep-alive RLOR trainer jobs running at once (girandole.finetune.keep_alive): each holds a
    # float32 copy of its base model in a process of its own
    max_rlor_trainers: int = 2
    webhook_secret: str | None = None
    log_level: str = "info"
    log_format: str = "auto"  # "json" (one object a line), "text", or "auto": text at a terminal
    # Keys database and usage rows (girandole.db); None: in memory (tests building apps directly)
    data_dir: str | None = None
    rate_limit_rpm: int | None = None  # default per-key requests/minute (keys may override)
    rate_limit_tpm: int | None = None  # default per-key tokens/minute (keys may override)
    # live keys a user may hold (made over REST): limits are per key; 0: no cap
    max_keys_per_user: int = 20
    # fine-tuning jobs of all kinds an account may have PENDING at once (the runner runs one job
    # at a time, fair across accounts: finetune/fair_queue.py); 0: no cap
    max_pending_finetune_jobs: int = 20
    # Engine sequences (choices: prompts x n of each request) admitted at once; more queue
    max_concurrent_requests: int = 64
    max_choices_per_request: int = 256  # prompts x n of one request; more is a 400
    max_queued_requests: int = 256  # more wait in the admission queue, then 429
    # GET /v1/accounts/{a}/metrics per account a minute, as Fireworks allows (then 429); 0: any
    metrics_scrapes_per_minute: int = 6
    queue_timeout: float = 30.0  # seconds in the queue before a 503
    batch_max_in_flight: int = 16  # batch lines at once, interactive choices included
    max_prompt_tokens: int | None = None  # None: the context length
    drain_seconds: float = 30.0  # SIGTERM: wait this long for requests in flight, then exit 0
    # Connections held at once (the longest-idle is closed above it); None: from the file limit
    max_connections: int | None = None
    request_read_timeout: float = 30.0  # a connection must send a whole request within this
    # an idle kept-alive connection is closed after this; above the clients' own pool expiry
    # (httpx, so the openai and fireworks SDKs: 5 s; undici: 4 s), so they close first
    keep_alive_timeout: int = 75
    response_write_timeout: float = 60.0  # a client reading nothing this long is cut off
    grammar_compile_timeout: float = 10.0  # a schema or grammar compiling longer: 400
    engine_stall_seconds: float = 60.0  # /health 503 when work waits and no step ends this long
    # Ray Serve backend: "local" (a cluster of this server's own) or a cluster's address;
    # None: the embedded backend
    ray: str | None = None
    ray_router: str = "prefix"  # prefix, round_robin, least_loaded
    ray_replica_cpus: float = 1.0  # Ray CPUs a replica reserves
    ray_replicas_per_node: int = 1  # replicas of one deployment on a node; 0: no limit
