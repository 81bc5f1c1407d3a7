"""HTTP routers: inference routes (served under /inference/v1 and /v1) and health."""
