"""Fireworks' loadTargets beyond concurrency, as a Ray Serve autoscaling policy.

Ray Serve's default policy scales on ongoing requests (`target_ongoing_requests`); Fireworks'
`loadTargets` may also name `requests_per_second`, `tokens_generated_per_second` and
`prompt_tokens_per_second` per replica. This policy asks for enough replicas to keep every named
load at or under its target: the most replicas any one of them needs. Each replica reports its
rates (GirandoleReplica.record_autoscaling_stats); Ray averages them over the look-back window
and, around this policy, applies the min/max bounds and the up/down/to-zero delays as for its own.

Ray pickles this module by value into its controller: it imports nothing of girandole.
"""

from __future__ import annotations

from typing import Any

RATE_TARGETS = ("requests_per_second", "tokens_generated_per_second", "prompt_tokens_per_second")


class FireworksLoadPolicy:
    def __init__(self, targets: dict[str, float], target_ongoing_requests: float) -> None:
        self.targets = {k: float(v) for k, v in targets.items() if k in RATE_TARGETS and v > 0}
        self.target_ongoing_requests = float(target_ongoing_requests)

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        desired = ctx.total_num_requests / self.target_ongoing_requests
        metrics = ctx.aggregated_metrics or {}
        for name, target in self.targets.items():
            total = sum((metrics.get(name) or {}).values())
            desired = max(desired, total / target)
        return desired, {}
