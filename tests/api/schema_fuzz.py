"""schemathesis cases for a share of a server's operations (test_api_fuzz.py): valid and invalid
requests drawn from its OpenAPI document, each sent, every 5xx kept. A module of its own so a
second process can fuzz the other share (drawing the cases takes the time, not the server)."""

from __future__ import annotations

import json

import httpx

EXAMPLES_PER_OPERATION = 20  # x 2 modes x all operations: some two thousand cases


def fuzz_share(url: str, share: int, shares: int) -> tuple[dict[str, int], list[str], int]:
    """Fuzz every `shares`-th operation of the server at `url`, from the `share`-th: the cases
    sent per operation and mode, the 5xx answers, and how many operations the server has."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.core.control import SkipTest
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    counts: dict[str, int] = {}
    failures: list[str] = []
    client = httpx.Client(timeout=60)
    # /inference/v1/... serves the same handlers as /v1/...: fuzzing one prefix covers both
    operations = [r.ok() for r in schema.get_all_operations()]
    operations = [op for op in operations if not op.path.startswith("/inference/")]

    def fuzz(operation, mode) -> None:
        label = f"{operation.label} [{mode.value}]"
        # an operation with nothing schemathesis can make invalid: each negative case it draws
        # is rejected, a second of draws per operation (some thirty of them) to Unsatisfiable;
        # told to draw negative cases only, it says so at its first draw (SkipTest). Any other
        # operation keeps both modes: a draw that happened to negate nothing is just rejected
        only_negative = mode is GenerationMode.NEGATIVE and _nothing_to_negate(operation)
        schema.config.generation.update(
            modes=[GenerationMode.NEGATIVE] if only_negative else list(GenerationMode)
        )

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            counts[label] = counts.get(label, 0) + 1
            kwargs = case.as_transport_kwargs(base_url=url)
            body = kwargs.get("json")
            content = kwargs.get("data")
            if body is not None:
                content = json.dumps(body, allow_nan=True).encode()
            r = client.request(
                kwargs["method"], kwargs["url"], content=content, headers=kwargs.get("headers"),
                params=kwargs.get("params"),
            )  # fmt: skip
            if r.status_code >= 500:
                failures.append(f"{label}: {r.status_code} {r.text[:300]} for {content!r:.300}")

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid (an operation without parameters)
            pass
        except SkipTest:  # the same, said at once
            assert only_negative, label

    for operation in operations[share::shares]:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode)
    client.close()
    return counts, failures, len(operations)


def _nothing_to_negate(operation) -> bool:
    """Whether schemathesis finds no location of `operation` it could make invalid (no
    parameter or body with a constraint to break): its own test, private to it (False, as
    before, where a version has it no longer)."""
    try:
        from schemathesis.core.parameters import ParameterLocation
        from schemathesis.generation import GenerationMode
        from schemathesis.specs.openapi._hypothesis import _draw_negated_locations
    except ImportError:
        return False

    def draw(strategy):  # only reached where some location can be negated
        return True

    explicit = dict.fromkeys(ParameterLocation)
    located = _draw_negated_locations(
        draw, operation, GenerationMode.NEGATIVE, explicit=explicit, body_is_generated=True
    )
    return located is None
