"""Fireworks' autoscaling policy as Ray Serve's AutoscalingConfig, and a manual scale's hold."""

from __future__ import annotations

import pytest

pytest.importorskip("ray", reason="the Ray backend needs ray[serve]")

from ray.serve.config import AutoscalingConfig  # noqa: E402

from girandole.deploy.ray_backend import (  # noqa: E402
    PUSH_INTERVAL_VARS,
    REPLICA_BATCH_SLOTS,
    ScalingPolicy,
    app_name_of,
    autoscaling_config,
    code_version,
)
from girandole.deploy.ray_router import PREFIX_BLOCK_TOKENS, prefix_hashes  # noqa: E402


def test_policy_maps_one_to_one():
    policy = ScalingPolicy(0, 4, 30.0, 600.0, 3600.0, {"concurrent_requests": 8})
    config = autoscaling_config(policy, initial=1)
    assert config["min_replicas"] == 0 and config["max_replicas"] == 4
    assert config["initial_replicas"] == 1
    assert config["target_ongoing_requests"] == 8
    assert (config["upscale_delay_s"], config["downscale_delay_s"]) == (30.0, 600.0)
    assert config["downscale_to_zero_delay_s"] == 3600.0
    AutoscalingConfig(**config)  # Ray accepts it


def test_push_interval_variables_become_the_metrics_interval(monkeypatch):
    # Ray 2.60 pushes metrics every metrics_interval_s and reads neither variable itself
    for name in PUSH_INTERVAL_VARS:
        monkeypatch.delenv(name, raising=False)
    assert "metrics_interval_s" not in autoscaling_config(ScalingPolicy(), initial=1)
    monkeypatch.setenv(PUSH_INTERVAL_VARS[0], "2")
    monkeypatch.setenv(PUSH_INTERVAL_VARS[1], "0.5")
    config = autoscaling_config(ScalingPolicy(scale_up_window=1), initial=1)
    assert config["metrics_interval_s"] == 0.5  # the shorter
    assert config["look_back_period_s"] == 1.5  # a second more (was 11 s at least)
    slow = autoscaling_config(ScalingPolicy(scale_up_window=60), initial=1)
    assert slow["look_back_period_s"] == 30  # the scale-up window, 30 s at most, as before
    with pytest.warns(DeprecationWarning):  # the field Ray still reads
        AutoscalingConfig(**config)
    monkeypatch.setenv(PUSH_INTERVAL_VARS[0], "fast")  # not a number: left out
    for value in ("60", "0"):  # longer than Serve's own 10 s, or not above 0: Serve's own
        monkeypatch.setenv(PUSH_INTERVAL_VARS[1], value)
        config = autoscaling_config(ScalingPolicy(scale_up_window=1), initial=1)
        assert "metrics_interval_s" not in config and config["look_back_period_s"] == 11


def test_default_load_target_is_a_fraction_of_the_batch():
    policy = ScalingPolicy(load_targets={"default": 0.5})
    assert policy.target_ongoing_requests() == 0.5 * REPLICA_BATCH_SLOTS


def test_manual_scale_holds_a_floor_or_a_cap():
    policy = ScalingPolicy(1, 3)
    up = autoscaling_config(policy, initial=1, floor=3)
    assert (up["min_replicas"], up["max_replicas"], up["initial_replicas"]) == (3, 3, 3)
    down = autoscaling_config(ScalingPolicy(2, 4), initial=2, cap=1)
    assert (down["min_replicas"], down["max_replicas"]) == (1, 1)
    for config in (up, down):
        AutoscalingConfig(**config)


def test_prefix_hashes_are_chained_whole_blocks():
    a = prefix_hashes(list(range(40)))
    b = prefix_hashes(list(range(32)) + [99] * 8)
    assert len(a) == 40 // PREFIX_BLOCK_TOKENS == len(b)
    assert a[:2] == b[:2]  # same first 32 tokens: same first two blocks
    c = prefix_hashes([7] + list(range(1, 40)))
    assert not set(a) & set(c)  # a different first token changes every later hash
    assert prefix_hashes(list(range(40)), salt="x") != a  # cache_salt separates them


def test_app_names():
    assert app_name_of("accounts/acme/deployments/pair") == "girandole--acme--pair"
    # ids may hold "--" themselves: two deployments never share one application
    assert app_name_of("accounts/acme--x/deployments/y") != app_name_of(
        "accounts/acme/deployments/x--y"
    )


def test_replicas_of_other_code_carry_another_version(tmp_path):
    """A deployment's replica version holds the source's digest, so a server restarted after an
    upgrade replaces replicas that older code started on a cluster that outlived it."""
    import shutil
    from pathlib import Path

    import girandole

    package = Path(girandole.__file__).parent
    copy = tmp_path / "girandole"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_version(copy) == code_version(package)
    engine = copy / "engine" / "scheduler.py"
    engine.write_text(engine.read_text() + "\n# changed\n")
    assert code_version.__wrapped__(copy) != code_version(package)


class Context:
    """What Ray's controller hands a policy (the fields FireworksLoadPolicy reads)."""

    def __init__(self, ongoing: float, replicas: int, **rates: dict[str, float]) -> None:
        self.total_num_requests = ongoing
        self.current_num_replicas = replicas
        self.aggregated_metrics = rates


def test_rate_targets_use_our_policy():
    from girandole.deploy.ray_policy import FireworksLoadPolicy

    policy = ScalingPolicy(1, 8, load_targets={"default": 0.8, "tokens_generated_per_second": 100})
    config = autoscaling_config(policy, initial=1)
    assert config["policy"]["policy_function"].endswith(":FireworksLoadPolicy")
    AutoscalingConfig(**config)  # Ray accepts it (and pickles the policy)
    fn = FireworksLoadPolicy(**config["policy"]["policy_kwargs"])
    # 3 replicas generating 450 tok/s in all, few requests: 4.5 replicas' worth of tokens
    ctx = Context(3, 3, tokens_generated_per_second={"r1": 150.0, "r2": 150.0, "r3": 150.0})
    assert fn(ctx)[0] == 4.5
    # the ongoing requests still count: 200 requests at 0.8 x 64 per replica
    assert fn(Context(200, 3))[0] == 200 / (0.8 * REPLICA_BATCH_SLOTS)
    assert "policy" not in autoscaling_config(ScalingPolicy(), initial=1)  # Ray's own default
