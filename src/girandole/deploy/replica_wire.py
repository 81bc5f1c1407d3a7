"""The token path between the ingress and a replica: length-prefixed frames over one TCP
connection per (ingress, replica), many requests multiplexed on it.

Frames are pickles of small tuples (engine objects: SamplingParams, RequestOutput). Pickle runs
code on load, so a connection is trusted only after its first frame carries the replica's
secret, a random token that reaches the ingress through Ray (itself trusted); anything else
closes the connection before any other frame is read.

    ingress -> replica: ("hello", token) then ("add", request_id, prompt, params, kwargs)
                        and ("abort", request_id); LoRA adapters: ("lora", request_id, name,
                        path) loads one (answered like a request, by AdapterLoaded or a
                        RemoteError), ("unload", name) drops one; an "add" for an adapter
                        carries its folder in kwargs["adapter_path"] (replica_adapters.py)
    replica -> ingress: ("out", [(request_id, RequestOutput | AdapterLoaded | RemoteError),
                        ...]): the outputs of one engine step, coalesced into one frame;
                        ("stats", engine stats) every second
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

_HEADER = struct.Struct("!I")
MAX_FRAME_BYTES = 256 * 1024 * 1024


@dataclass
class RemoteError:
    """An error of one request on the replica, sent in place of an output."""

    kind: str  # "value": bad input (a 400), "grammar", "dead": the engine stopped, "internal"
    message: str


@dataclass
class AdapterLoaded:
    """The answer to a ("lora", ...) request: the replica holds the adapter."""

    name: str


def encode(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message; IncompleteReadError when the peer closed the connection."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ConnectionError(f"frame of {size} bytes is over the limit")
    return pickle.loads(await reader.readexactly(size))


async def read_hello(reader: asyncio.StreamReader, token: str) -> bool:
    """Whether the first frame is ("hello", token), read without unpickling anything else."""
    import hmac

    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > 4096:
        return False
    body = await reader.readexactly(size)
    expected = pickle.dumps(("hello", token), protocol=pickle.HIGHEST_PROTOCOL)
    return hmac.compare_digest(body, expected)


def hello(token: str) -> bytes:
    return encode(("hello", token))
