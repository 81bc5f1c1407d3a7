"""Ray Serve's pickling by value of a deployment's router class and autoscaling policy, made
safe for the threads of this process.

Each time Serve builds a RequestRouterConfig or an AutoscalingPolicy from an import path (ours:
ray_router.py, ray_policy.py) it registers the module with cloudpickle, dumps the class by value
and unregisters the module. The registry is one set for the whole process and the three steps
are not atomic, and this process builds those models on two threads: the control thread's
deploy (`serve.deployment(...).options(...)`) and the status poller's `serve.status()`, which
builds every application's config again, each second. When the poller unregistered the module
inside the deploy's window, the deploy's own unregister raised ValueError, which pydantic
reports as "1 validation error for DeploymentConfig / request_router_config (or
autoscaling_config.policy): Value error, <module ...> is not registered for pickle by value":
the deployment went FAILED before Ray's controller saw it (a `:scale` under load on 2 CPUs;
two threads building them in a loop hit it dozens of times a second). A dump inside the other
thread's window also went by reference, not by value.

`install()` counts the registrations: a module stays registered until it is unregistered as
often as it was registered, and registering and unregistering take a lock.
"""

from __future__ import annotations

import threading
from collections import Counter
from types import ModuleType

_lock = threading.Lock()
_registered: Counter[str] = Counter()  # module name -> registrations not yet undone


def install() -> None:
    """Replace ray.cloudpickle's register/unregister_pickle_by_value (what Serve's config
    models call) by counted ones; once per process (later calls do nothing)."""
    from ray import cloudpickle

    with _lock:
        if getattr(cloudpickle.register_pickle_by_value, "girandole_counted", False):
            return
        register = cloudpickle.register_pickle_by_value
        unregister = cloudpickle.unregister_pickle_by_value

        def counted_register(module: ModuleType) -> None:
            with _lock:
                register(module)  # cloudpickle's checks (a module, imported) and its entry
                _registered[module.__name__] += 1

        def counted_unregister(module: ModuleType) -> None:
            with _lock:
                name = getattr(module, "__name__", None)
                if _registered[name] > 1:  # another registration still holds it
                    _registered[name] -= 1
                    return
                _registered.pop(name, None)
                unregister(module)

        counted_register.girandole_counted = True  # type: ignore[attr-defined]
        cloudpickle.register_pickle_by_value = counted_register
        cloudpickle.unregister_pickle_by_value = counted_unregister
