"""Backpressure: how many outputs a request's reader may leave unread before its producer waits.

A stream whose client stops reading makes the server's writes wait; without a bound, the engine
would go on generating the whole answer into memory (one never-read stream of 16 choices with
sampling masks grew a server 330 MB in 50 s). Each stage bounds what it holds for a reader that
lags, so the wait travels back to the engine, which then stops stepping the request:

- the response's fan-out (api/serving/fanout.py) stops taking a choice's outputs while
  `MAX_QUEUED_OUTPUTS` of them wait for the response;
- the AsyncEngine pauses the request while `unread_limit` outputs wait for its caller, and
  resumes it once they are read down to half (engine/async_engine.py, engine/scheduler.py);
- on a deployment on Ray, the ingress tells the replica to stop reading a request's outputs
  (its RemoteEngine holds `unread_limit` of them unread), and the replica's engine pauses it
  (deploy/remote_engine.py, deploy/replica_server.py).
"""

from __future__ import annotations

from girandole.sampling.params import SamplingParams

# Outputs a request's caller may leave unread: a few seconds of tokens (the event loop of a busy
# server falls behind by a few steps at most).
MAX_UNREAD_OUTPUTS = 64
# ... and with a sampling mask, whose every output carries a vocabulary-sized array.
MAX_UNREAD_MASKED_OUTPUTS = 4
# A choice's outputs the response's fan-out holds for it.
MAX_QUEUED_OUTPUTS = 4


def unread_limit(params: SamplingParams) -> int:
    """Unread outputs that pause a request; it resumes at half of them."""
    return MAX_UNREAD_MASKED_OUTPUTS if params.sampling_mask else MAX_UNREAD_OUTPUTS
