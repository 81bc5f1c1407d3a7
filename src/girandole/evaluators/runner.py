"""Runs an evaluator's Python code in a child process and scores rows with it.

One child serves many rows (its start, an interpreter plus the user's imports, is paid once). The
child is a crash, timeout and resource barrier, not a security boundary: docs/evaluators.md says
what it does and does not isolate.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

_CHILD = Path(__file__).with_name("child.py")
_MIN_START_TIMEOUT_S = 30.0  # the user's top-level imports (numpy, ...) run at start
_LOG_TAIL_CHARS = 2000


@dataclass(frozen=True)
class EvaluatorCode:
    """What an evaluator resource holds: its source files and the function that scores a row."""

    files: dict[str, str]  # file name -> source (criteria[].codeSnippets.fileContents)
    entry_file: str  # e.g. "main.py"
    entry_func: str  # e.g. "evaluate"


@dataclass(frozen=True)
class Score:
    score: float | None  # None when the row failed (error set)
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""  # the exception / timeout text for a failed row
    criteria: dict[str, float] = field(default_factory=dict)  # each criterion's, when several


@dataclass(frozen=True)
class ChildLimits:
    """What one child may use: seconds per row (then the row fails and the child restarts) and
    MiB of address space (the server's --evaluator-timeout and --evaluator-memory)."""

    timeout_s_per_row: float = 30.0
    memory_mb: int = 2048

    def runner(self, code: EvaluatorCode, env: dict[str, str]) -> EvaluatorRunner:
        """A runner of `code` whose child keeps to these limits."""
        return EvaluatorRunner(code, env, self.timeout_s_per_row, self.memory_mb)

    def to_json(self) -> dict[str, Any]:
        return {"timeoutSeconds": self.timeout_s_per_row, "memoryMiB": self.memory_mb}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChildLimits:
        return cls(float(data["timeoutSeconds"]), int(data["memoryMiB"]))


class EvaluatorLoadError(Exception):
    """The child could not import the entry file or find the entry function."""


def check_file_name(name: str) -> str:
    """The error for a file name that would land outside the evaluator's directory, or ''."""
    path = PurePosixPath(name)
    parts = name.split("/")
    if (
        path.is_absolute()
        or "\\" in name
        or "\x00" in name
        or any(p in ("", ".", "..") for p in parts)
    ):
        return f"file name {name!r} must be a relative path inside the evaluator"
    if any(len(p.encode("utf-8", "surrogatepass")) > 255 for p in parts):
        return f"file name {name[:40]!r}...: a part of it is longer than 255 bytes"
    return ""


def child_env(secrets: dict[str, str], home: str) -> dict[str, str]:
    """The child's whole environment: PATH, HOME, LANG and the account's secrets, nothing of the
    server's own (its keys, tokens and settings stay out)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": home,
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }
    env.update({str(k): str(v) for k, v in secrets.items()})
    return env


class _Child:
    """One started child process and its line-buffered protocol pipe."""

    def __init__(self, code: EvaluatorCode, env: dict[str, str], root: Path, memory_mb: int,
                 timeout_s: float) -> None:  # fmt: skip
        code_dir = root / "code"
        self.log_path = root / "stderr.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in kill()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-I",
                str(_CHILD),
                str(code_dir),
                code.entry_file,
                code.entry_func,
                str(memory_mb),
                str(timeout_s),
            ],  # fmt: skip
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=code_dir,
            env=child_env(env, str(code_dir)),
            start_new_session=True,  # its own process group: kill() reaches what it forks
        )
        self._buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        self.process.stdin.flush()

    def receive(self, timeout_s: float) -> dict[str, Any] | None:
        """The next message, or None on timeout; EOFError when the child exited."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise EOFError
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def exit_text(self) -> str:
        """How the child ended, with the tail of its stderr."""
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        how = f"was killed by signal {-code}" if code and code < 0 else f"exited with code {code}"
        tail = log_tail(self.log_path).strip()
        return f"the evaluator process {how}" + (f": {tail.splitlines()[-1]}" if tail else "")

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:  # a broken pipe on flush: the child is gone anyway
                    pass
        self._log.close()


def log_tail(path: Path, chars: int = _LOG_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - chars))
            return log.read().decode("utf-8", "replace")
    except OSError:
        return ""


_live: weakref.WeakSet[EvaluatorRunner] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """No child outlives the server (the child also exits when it sees its parent gone)."""
    for runner in list(_live):
        runner.close()


class RunnerSet:
    """The runners at work for one owner (a server's builds), closed together when it stops; a
    runner added after that is closed at once (EvaluatorLoadError)."""

    def __init__(self) -> None:
        self._runners: set[EvaluatorRunner] = set()
        self._lock = threading.Lock()
        self._stopped = False

    def add(self, runner: EvaluatorRunner) -> None:
        with self._lock:
            if not self._stopped:
                self._runners.add(runner)
                return
        runner.close()
        raise EvaluatorLoadError("the server is stopping")

    def discard(self, runner: EvaluatorRunner) -> None:
        with self._lock:
            self._runners.discard(runner)

    def close_all(self) -> None:
        with self._lock:
            self._stopped = True
            runners = list(self._runners)
        for runner in runners:
            runner.close()


class EvaluatorRunner:
    """Scores rows with an evaluator's code in one child process, restarted after a timeout or a
    crash. Thread-safe: calls to score() run one at a time."""

    def __init__(self, code: EvaluatorCode, env: dict[str, str], timeout_s_per_row: float = 30.0,
                 memory_mb: int = 2048) -> None:  # fmt: skip
        for name in code.files:
            if error := check_file_name(name):
                raise ValueError(error)
        if code.entry_file not in code.files:
            raise ValueError(f"entry file {code.entry_file!r} is not among the files")
        self.code = code
        self.env = dict(env)
        self.timeout_s_per_row = timeout_s_per_row
        self.memory_mb = memory_mb
        self._root = Path(tempfile.mkdtemp(prefix="girandole-evaluator-"))
        code_dir = self._root / "code"
        for name, source in code.files.items():
            path = code_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(source, encoding="utf-8")
        self._child: _Child | None = None
        self._starting: _Child | None = None  # a child loading the code: close() kills it too
        self._load_error = ""
        self._lock = threading.Lock()
        self._closed = False
        _live.add(self)

    def start(self) -> None:
        """Start the child now and wait until it has loaded the entry function; raises
        EvaluatorLoadError with the reason when it cannot (score() would fail every row)."""
        with self._lock:
            self._ensure_child()
            if self._load_error:
                raise EvaluatorLoadError(self._load_error)

    def log(self) -> str:
        """The tail of the child's stderr: the user code's prints and load tracebacks."""
        return log_tail(self._root / "stderr.log")

    def score(self, rows: list[dict]) -> list[Score]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the evaluator runner is closed")
            return [self._score_row(row) for row in rows]

    def _ensure_child(self) -> _Child | None:
        if self._child is not None or self._load_error:
            return self._child
        if self._closed:
            self._load_error = "the evaluator runner was closed"
            return None
        child = self._starting = _Child(self.code, self.env, self._root, self.memory_mb, self.timeout_s_per_row)  # fmt: skip
        try:
            if self._closed:  # close() came as it started: it may not have seen the child
                raise EOFError
            ready = child.receive(max(_MIN_START_TIMEOUT_S, self.timeout_s_per_row))
        except EOFError:
            self._load_error = "the evaluator runner was closed" if self._closed else child.exit_text()  # fmt: skip
            child.kill()
            return None
        finally:
            self._starting = None
        if ready is None or not ready.get("ready"):
            child.kill()
            self._load_error = (
                "loading the evaluator timed out" if ready is None else str(ready.get("error"))
            )
            return None
        self._child = child
        return child

    def _score_row(self, row: dict) -> Score:
        if self._closed:
            return Score(score=None, error="the evaluator runner was closed")
        child = self._ensure_child()
        if child is None:
            return Score(score=None, error=f"the evaluator failed to load: {self._load_error}")
        try:
            child.send({"row": row})
            answer = child.receive(self.timeout_s_per_row)
        except (EOFError, BrokenPipeError):
            error = "the evaluator runner was closed" if self._closed else child.exit_text()
            self._drop_child()
            return Score(score=None, error=error)
        except ValueError:  # not a JSON line: the code wrote to the protocol's own descriptor
            self._drop_child()
            return Score(score=None, error="the evaluator process broke its protocol (restarted)")
        if answer is None:
            self._drop_child()
            return Score(score=None, error=f"timed out after {self.timeout_s_per_row:g} s")
        if "error" in answer:
            return Score(score=None, error=str(answer["error"]))
        return Score(
            score=float(answer["score"]),
            reason=str(answer.get("reason") or ""),
            metrics={k: float(v) for k, v in (answer.get("metrics") or {}).items()},
        )

    def _drop_child(self) -> None:
        """Kill the child; the next row starts a fresh one."""
        if self._child is not None:
            self._child.kill()
            self._child = None

    def close(self) -> None:
        """Kill the child (a score() in flight ends at once: its rows left fail) and remove the
        files. Safe from another thread, and more than once."""
        self._closed = True
        for child in (self._child, self._starting):
            if child is not None and child.process.poll() is None:
                try:  # not behind the lock: a row, or a load, may hold it for its whole timeout
                    os.killpg(child.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        with self._lock:
            self._drop_child()
            shutil.rmtree(self._root, ignore_errors=True)
        _live.discard(self)

    def __enter__(self) -> EvaluatorRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
