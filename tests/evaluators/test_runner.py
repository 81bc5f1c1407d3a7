"""EvaluatorRunner against real child processes: one shared runner whose rows pick a behaviour."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator

import pytest

from girandole.evaluators.runner import EvaluatorCode, EvaluatorLoadError, EvaluatorRunner, Score

MAIN = """
import json, os, time
from helpers import exact_match


class Result:  # reward-kit's EvaluateResult, duck-typed
    def __init__(self, score, reason, metrics):
        self.score, self.reason, self.metrics = score, reason, metrics


def evaluate(messages, ground_truth=None, mode="match", **kwargs):
    answer = messages[-1]["content"]
    if mode == "match":
        return exact_match(answer, ground_truth)
    if mode == "dict":
        return {"score": 0.5, "reason": "half", "metrics": {"len": len(answer),
                "exact": {"score": 1, "reason": "same"}}}
    if mode == "object":
        return Result(0.25, "quarter", {"m": Result(0.75, "", {})})
    if mode == "raise":
        return 1 / 0
    if mode == "sleep":
        time.sleep(60)
    if mode == "hog":
        return len(bytearray(8 * 1024**3))
    if mode == "print":
        print("chatter on stdout", kwargs)
        return 1
    if mode == "env":
        return {"score": 1, "reason": json.dumps({"env": dict(os.environ), "cwd": os.getcwd()})}
    if mode == "nan":
        return float("nan")
    if mode == "string":
        return "great"
    if mode == "huge":
        return 10**400
    if mode == "numpy":
        import numpy
        return {"score": numpy.mean([0.0, 1.0]), "metrics": {"n": numpy.int64(2), "ok": numpy.bool_(True)}}
    if mode == "exit":
        os._exit(3)
    if mode == "protocol":  # a line on every descriptor but 0-2: one of them is the protocol's
        for fd in range(3, 64):
            try:
                os.write(fd, b"garbage\\n")
            except OSError:
                pass
        return 1
"""

HELPERS = """
def exact_match(answer, truth):
    return answer.strip() == str(truth).strip()
"""


def row(answer: str = "4", truth: object = "4", **fields: object) -> dict:
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "ground_truth": truth, **fields}


@pytest.fixture(scope="module")
def runner() -> Iterator[EvaluatorRunner]:
    code = EvaluatorCode({"main.py": MAIN, "helpers.py": HELPERS}, "main.py", "evaluate")
    with EvaluatorRunner(code, {"MY_SECRET": "s3cret"}, timeout_s_per_row=1.5,
                         memory_mb=1024) as runner:  # fmt: skip
        yield runner


def test_scores_bool_returns_and_imports_a_sibling_file(runner: EvaluatorRunner) -> None:
    scores = runner.score([row("4", "4"), row("5", "4"), row(" 4\n", 4)])
    assert [s.score for s in scores] == [1.0, 0.0, 1.0]
    assert all(s.error == "" for s in scores)


def test_dict_and_object_returns(runner: EvaluatorRunner) -> None:
    as_dict, as_object = runner.score([row(mode="dict"), row(mode="object")])
    assert as_dict == Score(0.5, "half", {"len": 1.0, "exact": 1.0})
    assert as_object == Score(0.25, "quarter", {"m": 0.75})


def test_exception_fails_only_its_row(runner: EvaluatorRunner) -> None:
    scores = runner.score([row(), row(mode="raise"), row("x")])
    assert scores[1].score is None
    assert scores[1].error == "ZeroDivisionError: division by zero"
    assert [scores[0].score, scores[2].score] == [1.0, 0.0]


def test_bad_return_values_name_what_was_returned(runner: EvaluatorRunner) -> None:
    nan, text, missing, huge = runner.score(
        [row(mode="nan"), row(mode="string"), {"ground_truth": 1}, row(mode="huge")]
    )
    assert huge.score is None and "OverflowError" in huge.error
    assert nan.score is None and "not finite" in nan.error and "nan" in nan.error
    assert text.score is None and "str 'great'" in text.error
    assert missing.error == "the row has no 'messages'"


def test_timeout_kills_the_row_and_the_rest_continue(runner: EvaluatorRunner) -> None:
    scores = runner.score([row(), row(mode="sleep"), row()])
    assert scores[1] == Score(None, error="timed out after 1.5 s")
    assert [scores[0].score, scores[2].score] == [1.0, 1.0]


def test_memory_hog_hits_the_limit(runner: EvaluatorRunner) -> None:
    hog, after = runner.score([row(mode="hog"), row()])
    assert hog.score is None and "MemoryError" in hog.error
    assert after.score == 1.0


def test_child_exit_is_that_rows_error(runner: EvaluatorRunner) -> None:
    dead, after = runner.score([row(mode="exit"), row()])
    assert dead.score is None and "exited with code 3" in dead.error
    assert after.score == 1.0


def test_garbage_on_the_protocol_fails_the_row_and_restarts(runner: EvaluatorRunner) -> None:
    broken, after = runner.score([row(mode="protocol"), row()])
    assert broken == Score(None, error="the evaluator process broke its protocol (restarted)")
    assert after.score == 1.0


def test_print_in_user_code_does_not_break_the_protocol(runner: EvaluatorRunner) -> None:
    (printed,) = runner.score([row(mode="print", extra="field")])
    assert printed.score == 1.0
    assert "chatter on stdout {'extra': 'field'}" in runner.log()


def test_env_holds_the_secrets_and_none_of_the_servers(runner: EvaluatorRunner) -> None:
    os.environ["GIRANDOLE_TEST_PARENT_ONLY"] = "leak"
    try:
        (result,) = runner.score([row(mode="env")])
    finally:
        del os.environ["GIRANDOLE_TEST_PARENT_ONLY"]
    seen = json.loads(result.reason)
    env = seen["env"]
    assert env["MY_SECRET"] == "s3cret"
    assert env["HOME"] == seen["cwd"]
    # LC_CTYPE: Python's own C-locale coercion (PEP 538) may add it.
    assert set(env) <= {"PATH", "HOME", "LANG", "LC_CTYPE", "MY_SECRET"}


def test_site_packages_import(runner: EvaluatorRunner) -> None:
    (mean,) = runner.score([row(mode="numpy")])  # numpy's scalars are numbers
    assert mean == Score(0.5, metrics={"n": 2.0, "ok": 1.0})


def test_load_errors_are_reported() -> None:
    missing = EvaluatorCode({"main.py": "def other(): pass\n"}, "main.py", "evaluate")
    with EvaluatorRunner(missing, {}) as runner:
        with pytest.raises(EvaluatorLoadError, match="main.py has no function 'evaluate'"):
            runner.start()
        (failed,) = runner.score([row()])
        assert failed.score is None and "has no function 'evaluate'" in failed.error
    broken = EvaluatorCode({"main.py": "import not_a_module_here\n"}, "main.py", "evaluate")
    with EvaluatorRunner(broken, {}) as runner:
        with pytest.raises(EvaluatorLoadError, match="No module named 'not_a_module_here'"):
            runner.start()
        assert "Traceback" in runner.log()


def test_file_names_stay_inside() -> None:
    for name in ("../x.py", "/etc/x.py", "./x.py", "a//x.py", "pkg/"):
        with pytest.raises(ValueError, match="relative path"):
            EvaluatorRunner(EvaluatorCode({name: ""}, name, "f"), {})
    with pytest.raises(ValueError, match="entry file 'main.py'"):
        EvaluatorRunner(EvaluatorCode({"a.py": ""}, "main.py", "f"), {})


def test_close_from_another_thread_ends_a_row_in_flight() -> None:
    import threading
    import time

    code = EvaluatorCode({"main.py": MAIN, "helpers.py": HELPERS}, "main.py", "evaluate")
    runner = EvaluatorRunner(code, {}, timeout_s_per_row=30)
    runner.start()
    threading.Timer(0.3, runner.close).start()
    started = time.monotonic()
    scores = runner.score([row(mode="sleep"), row()])
    assert time.monotonic() - started < 10
    assert [s.error for s in scores] == ["the evaluator runner was closed"] * 2


def test_the_child_ends_when_the_server_dies_without_closing_it() -> None:
    """A server killed (no close, no atexit) while a row runs (the child is in the user's code,
    not reading its closed stdin) leaves no evaluator child behind."""
    import subprocess
    import sys
    import time

    script = (
        "import os, threading, time\n"
        "from girandole.evaluators.runner import EvaluatorCode, EvaluatorRunner\n"
        "code = 'import time\\ndef evaluate(**kw):\\n    time.sleep(60)'\n"
        "r = EvaluatorRunner(EvaluatorCode({'main.py': code}, 'main.py', 'evaluate'), {})\n"
        "r.start()\n"
        "threading.Thread(target=r.score, args=([{'messages': []}],), daemon=True).start()\n"
        "time.sleep(0.3)\n"
        "print(r._child.process.pid, r._root, flush=True)\n"
        "os._exit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    pid_text, root = done.stdout.split()
    pid = int(pid_text)
    deadline = time.monotonic() + 10
    try:
        while os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]:  # fmt: skip
            assert time.monotonic() < deadline, "the orphaned child still runs"
            time.sleep(0.1)
    except AssertionError:
        os.kill(pid, 9)
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the dead server's to remove
