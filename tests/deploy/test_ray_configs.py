"""The options girandole hands Ray Serve for a deployment, validated by Ray's own models (no
cluster), at every edge of the policy and of a `:scale` hold, and built on two threads at once
as the control thread's deploy and the status poller's `serve.status()` build them."""

from __future__ import annotations

import itertools
import threading
import time
import warnings

import pytest

pytest.importorskip("ray", reason="the Ray backend needs ray[serve]")

from pydantic import ValidationError  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig  # noqa: E402

from girandole.deploy import ray_pickling  # noqa: E402
from girandole.deploy.ray_backend import (  # noqa: E402
    PUSH_INTERVAL_VARS,
    RayOptions,
    ScalingPolicy,
    autoscaling_config,
    error_text,
    failure_of,
    replica_options,
)
from girandole.deploy.ray_replica import GirandoleReplica  # noqa: E402

RATE = {"tokens_generated_per_second": 100000.0}  # a rate target: our policy on Ray's controller


def ray_accepts(options: dict) -> None:
    """Serve's DeploymentConfig, AutoscalingConfig and RequestRouterConfig of these options, as
    `serve.deployment(...).options(...)` builds them in _deploy; a FutureWarning (a look-back not
    above the metrics interval: an error in a later Ray) fails too."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # metrics_interval_s, still read
        serve.deployment(GirandoleReplica).options(**options)


@pytest.mark.parametrize("interval", [None, "0.5"])
def test_every_edge_of_the_policy_and_a_hold_makes_a_config_ray_accepts(monkeypatch, interval):
    for name in PUSH_INTERVAL_VARS:  # unset: Serve's 10 s; 0.5: as the Ray tests set them
        if interval is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, interval)
    windows = (0.0, 0.5, 1.0, 1.5, 11.0, 30.0, 3600.0)
    targets = ({"concurrent_requests": 0.01}, {"default": 0.01}, {"default": 1.0}, RATE)
    ranges = ((0, 1), (1, 1), (0, 2), (2, 4))  # min, max as the registry allows them
    holds = ((None, None), (1, None), (2, None), (5, None), (None, 1), (None, 3))  # floor, cap
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for (low, high), (floor, cap), initial, window in itertools.product(
            ranges, holds, (0, 1, 2, 5), windows
        ):
            policy = ScalingPolicy(low, high, window, window, window, {"default": 0.8})
            AutoscalingConfig(**autoscaling_config(policy, initial, floor, cap))
            checked += 1
        for target, window in itertools.product(targets, windows):
            policy = ScalingPolicy(0, 2, window, window, window, target)
            AutoscalingConfig(**autoscaling_config(policy, 1, 2, None))
            checked += 1
    assert checked == len(ranges) * len(holds) * 4 * len(windows) + len(targets) * len(windows)
    # the whole options, with each router and a rate policy, through Serve's deployment
    for router in ("prefix", "round_robin", "least_loaded"):
        options = RayOptions(router=router, replicas_per_node=None if router == "prefix" else 1)
        ray_accepts(replica_options(options, ScalingPolicy(1, 2, 1, 2, 4, RATE), 1, floor=2))


def test_a_deploy_and_a_status_read_build_ray_configs_at_once():
    # Serve pickles our router class and policy by value, registering their modules with
    # cloudpickle around each dump (one registry for the process). The control thread builds
    # them for a deploy while the poller's serve.status() builds them again (RequestRouterConfig
    # and AutoscalingPolicy from their import paths, each second): the poller's unregister fell
    # inside the deploy's window, and the deploy failed with "1 validation error for
    # DeploymentConfig ... is not registered for pickle by value" (a :scale under load)
    ray_pickling.install()  # as RayBackend does before Serve starts
    options = replica_options(RayOptions(), ScalingPolicy(1, 2, 1, 2, 4, RATE), 1, floor=2)
    router, policy = options["request_router_config"], options["autoscaling_config"]["policy"]
    errors: list[str] = []
    counts = {"deploy": 0, "status": 0}
    stop = time.monotonic() + 2.0

    def repeat(what: str, build) -> None:
        while time.monotonic() < stop or counts[what] < 5:
            try:
                build()
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                errors.append(f"{what}: {error_text(exc)}")
            counts[what] += 1

    def status() -> None:
        RequestRouterConfig(**router)
        AutoscalingPolicy(**policy)

    threads = [
        threading.Thread(target=repeat, args=("deploy", lambda: ray_accepts(options))),
        threading.Thread(target=repeat, args=("status", status)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, f"{len(errors)} of {counts}: {errors[:3]}"
    # and the registry is as before: our modules are pickled by reference again
    from ray import cloudpickle

    assert not {
        router["request_router_class"].split(":")[0],
        policy["policy_function"].split(":")[0],
    } & (cloudpickle.list_registry_pickle_by_value())


def test_a_refused_config_names_its_field_and_value():
    # a deploy that Serve refused said only "ValidationError: 1 validation error for
    # DeploymentConfig" where it was shown: the field and the value came on later lines
    with pytest.raises(ValidationError) as refused:
        serve.deployment(GirandoleReplica).options(health_check_period_s=0)
    text = error_text(refused.value)
    assert "\n" not in text and "errors.pydantic.dev" not in text
    assert text.startswith("ValidationError: 1 validation error for DeploymentConfig")
    assert "health_check_period_s" in text and "greater than 0" in text
    assert "input_value=0" in text


def test_a_replica_failure_keeps_the_whole_error():
    message = (
        "The deployment failed to start 3 times in a row. This may be due to a problem with"
        " its constructor or initial health check failing. See controller and replica logs"
        " for details. Error:\n\x1b[36mray::ServeReplica:girandole--acme--x:replica"
        ".initialize_and_get_metadata()\x1b[39m (pid=7, ip=10.0.0.1)\n"
        "Traceback (most recent call last):\n"
        '  File "/x/replica.py", line 9, in initialize\n'
        "    EngineConfig(max_num_seqs=0)\n"
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for EngineConfig\n"
        "max_num_seqs\n"
        "  Input should be greater than 0 [type=greater_than, input_value=0, input_type=int]\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/greater_than\n"
    )
    assert failure_of(message) == (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for EngineConfig"
        " / max_num_seqs / Input should be greater than 0 [type=greater_than, input_value=0,"
        " input_type=int] (3 tries)"
    )
    plain = 'Traceback (most recent call last):\n  File "/x.py", line 1\nFileNotFoundError: /m'
    assert failure_of(plain) == "FileNotFoundError: /m"
    assert failure_of("FileNotFoundError: no weights") == "FileNotFoundError: no weights"
