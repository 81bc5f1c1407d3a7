"""Models, deployments and API keys that this server knows."""
