"""Operations: keys and authentication, rate limits, the admission queue, usage, metrics,
request tracking, logs, the serve flags, and the health/ready/metrics routes."""
