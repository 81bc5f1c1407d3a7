"""The evaluator's child process: loads the user's entry file and scores rows sent as JSON lines.

Run by path with ``python -I child.py <code_dir> <entry_file> <entry_func> <memory_mb>`` (see
runner.py): it imports nothing from girandole, so ``-I`` (no PYTHONPATH, no user site, no script
directory) still finds it, and sys.path is the stdlib, site-packages and the evaluator's own files.

Protocol, one JSON object a line on the stdout it had at start (the user code's stdout goes to
stderr): first ``{"ready": true}`` or ``{"ready": false, "error": ...}``; then for each request
``{"row": {...}}`` one answer ``{"score": x, "reason": ..., "metrics": {...}}`` or ``{"error": ...}``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
import signal
import sys
import threading
import time
import traceback
from typing import Any

_FILE_SIZE_LIMIT = 64 * 1024 * 1024  # a runaway log or output file stops here


def _limit_resources(memory_mb: int) -> None:
    """Address space and file size limits; no core files. Set here, not in a preexec_fn, which is
    unsafe in a threaded server."""
    memory = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (_FILE_SIZE_LIMIT, _FILE_SIZE_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # A write past the file size limit fails with EFBIG (an exception in that row) instead of the
    # default SIGXFSZ, which would kill the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _limit_cpu(seconds: float) -> None:
    """A CPU-time budget for the next row, on top of what the process has used so far (the parent's
    wall-clock timeout is the real barrier; this stops a spinning child whose parent is stuck)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(used.ru_utime + used.ru_stime + seconds) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _exit_with_parent() -> None:
    """End this process when the server that started it dies (it is then re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _protocol_streams() -> tuple[Any, Any]:
    """Keep the original stdin/stdout for the protocol; the user code gets /dev/null as stdin and
    stderr as stdout (also at the file descriptor level, for prints from C extensions)."""
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto_in, proto_out


def _load(code_dir: str, entry_file: str, entry_func: str) -> Any:
    sys.path.insert(0, code_dir)
    path = os.path.join(code_dir, entry_file)
    name = os.path.splitext(entry_file)[0].replace("/", ".")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {entry_file!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    func = getattr(module, entry_func, None)
    if func is None:
        raise AttributeError(f"{entry_file} has no function {entry_func!r}")
    if not callable(func):
        raise TypeError(f"{entry_file}: {entry_func!r} is not callable")
    return func


def _is_number(value: Any) -> bool:
    """A bool, int or float, or a scalar that converts to one (numpy's float64, int64, bool_)."""
    if isinstance(value, (bool, int, float)):
        return True
    return hasattr(value, "__float__") and not isinstance(value, (str, bytes, dict))


def _number(value: Any, what: str) -> float:
    """A finite float from a number or bool; ValueError naming what was returned otherwise."""
    if _is_number(value):
        number = float(value)
        if math.isfinite(number):
            return number
        raise ValueError(f"{what} is not finite: {number!r}")
    raise ValueError(f"{what} is not a number: {_describe(value)}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:200]}"


def _field(result: Any, name: str) -> Any:
    if isinstance(result, dict):
        return result.get(name)
    return getattr(result, name, None)


def _metric(value: Any, name: str) -> float:
    """reward-kit's MetricResult ({score, reason, ...}, dict or object) or a bare number."""
    if _is_number(value):
        return _number(value, f"metric {name!r}")
    score = _field(value, "score")
    if score is None:
        raise ValueError(f"metric {name!r} has no score: {_describe(value)}")
    return _number(score, f"metric {name!r} score")


def _shape(result: Any) -> dict[str, Any]:
    """The entry function's return value as the protocol's answer (score, reason, metrics)."""
    if _is_number(result):
        return {"score": _number(result, "the returned score"), "reason": "", "metrics": {}}
    score = _field(result, "score")
    if score is None:
        raise ValueError(
            "the evaluator returned neither a number nor a result with a score: "
            + _describe(result)
        )
    reason = _field(result, "reason")
    metrics = _field(result, "metrics") or {}
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics is not a dict: {_describe(metrics)}")
    return {
        "score": _number(score, "score"),
        "reason": "" if reason is None else str(reason),
        "metrics": {str(k): _metric(v, str(k)) for k, v in metrics.items()},
    }


def _score(func: Any, row: Any) -> dict[str, Any]:
    if not isinstance(row, dict) or "messages" not in row:
        return {"error": "the row has no 'messages'"}
    fields = dict(row)
    messages = fields.pop("messages")
    ground_truth = fields.pop("ground_truth", None)
    try:
        result = func(messages=messages, ground_truth=ground_truth, **fields)
    except (Exception, SystemExit) as exc:  # the user's code: any failure is that row's
        return {"error": _last_line(exc)}
    try:
        return _shape(result)
    except ValueError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # a result whose attributes raise, a score too large for a float
        return {"error": f"reading the evaluator's result: {_last_line(exc)}"}


def _last_line(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


def main(argv: list[str]) -> int:
    code_dir, entry_file, entry_func, memory_mb, timeout_s = argv[1:6]
    proto_in, proto_out = _protocol_streams()
    _exit_with_parent()
    os.chdir(code_dir)
    _limit_resources(int(memory_mb))

    def send(message: dict[str, Any]) -> None:
        proto_out.write(json.dumps(message) + "\n")
        proto_out.flush()

    try:
        func = _load(code_dir, entry_file, entry_func)
    except (Exception, SystemExit) as exc:  # a load failure is reported, not raised
        traceback.print_exc()
        send({"ready": False, "error": _last_line(exc)})
        return 1
    send({"ready": True})
    for line in proto_in:
        request = json.loads(line)
        _limit_cpu(float(timeout_s))
        send(_score(func, request.get("row")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
