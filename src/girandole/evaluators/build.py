"""An evaluator's build: its requirements checked against the server's Python environment
(girandole installs nothing) and each criterion's entry function loaded once in a child
process."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass

from girandole.evaluators.criteria import Criterion
from girandole.evaluators.runner import ChildLimits, EvaluatorLoadError, RunnerSet

ACTIVE, BUILDING, BUILD_FAILED = "ACTIVE", "BUILDING", "BUILD_FAILED"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class BuildResult:
    state: str  # ACTIVE or BUILD_FAILED
    message: str  # why it failed ("" when ACTIVE)
    log: str  # what the build did, and the child's stderr


def requirement_names(requirements: str) -> list[str]:
    """The distribution names of a requirements.txt's lines (versions, extras, markers, options
    and comments left out)."""
    names = []
    for line in requirements.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        found = _NAME.match(line)
        if found:
            names.append(found.group(0))
    return names


def is_installed(name: str) -> bool:
    """A distribution of that name is installed, or a module of that name imports."""
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    module = name.replace("-", "_")
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def build(
    criteria: list[Criterion],
    requirements: str,
    env: dict[str, str],
    limits: ChildLimits | None = None,
    live: RunnerSet | None = None,
) -> BuildResult:
    """Check the requirements, then load each criterion's entry function in a child (started and
    closed, one after another) under the server's `limits`. `live`: the server's, which closes
    the runner (kills a child still loading) when it stops."""
    names = requirement_names(requirements)
    log = [f"requirements: {', '.join(names) or 'none'}"]
    missing = [n for n in names if not is_installed(n)]
    if missing:
        message = (
            f"requirements not installed on this server: {', '.join(missing)} (girandole does"
            " not install packages: install them in the server's environment)"
        )
        return BuildResult(BUILD_FAILED, message, "\n".join([*log, message]) + "\n")
    for criterion in criteria:
        code = criterion.code
        # the criterion named only when there are several (one's messages stay as they were)
        which = f"criterion {criterion.name}: " if len(criteria) > 1 else ""
        log.append(f"{which}loading {code.entry_func} from {code.entry_file}")
        try:
            with (limits or ChildLimits()).runner(code, env) as runner:
                try:
                    if live is not None:
                        live.add(runner)
                    runner.start()
                except EvaluatorLoadError as exc:
                    message = f"{which}loading {code.entry_file} failed: {exc}"
                    return BuildResult(BUILD_FAILED, message, "\n".join([*log, runner.log(), message]))  # fmt: skip
                finally:
                    if live is not None:
                        live.discard(runner)
                log.append(runner.log())
        except (
            ValueError,
            OSError,
        ) as exc:  # a file name outside the folder, or one it cannot hold
            message = f"{which}{exc}"
            return BuildResult(BUILD_FAILED, message, "\n".join([*log, message]))
    log.append("ready")
    return BuildResult(ACTIVE, "", "\n".join(line for line in log if line) + "\n")
