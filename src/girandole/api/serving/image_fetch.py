"""Fetching an http(s) image URL a request names, guarded against server-side request forgery:
without --allow-private-image-urls the server fetches only from public addresses, so a client
cannot make it read the cloud metadata service, its own admin ports or the office network.

Every address the host resolves to must be public (not loopback, private, link-local,
multicast, reserved, shared or otherwise non-global; an IPv4-mapped IPv6 address is judged as
its IPv4 one), and the connection goes to the address that was checked (the URL's host replaced
by it, the Host header and TLS SNI kept as the name, so the certificate is still checked
against the name): a second DNS answer cannot swap in another address. Redirects are followed
here, at most MAX_REDIRECTS, each target checked the same way. Left to the operator: an HTTP
proxy in the environment (HTTP(S)_PROXY) makes the connection itself, to the checked address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx

from girandole.api.http.errors import bad_request

MAX_IMAGE_BYTES = 20 << 20  # one image's file, as sent or fetched
FETCH_TIMEOUT_S = 10.0
MAX_REDIRECTS = 5
ALLOW_FLAG = "--allow-private-image-urls (GIRANDOLE_ALLOW_PRIVATE_IMAGE_URLS=1)"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(address: Address) -> bool:
    """Whether the server may fetch from `address` without --allow-private-image-urls."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def too_big(where: str) -> str:
    return f"The image is larger than {MAX_IMAGE_BYTES >> 20} MB, field: '{where}'"


async def resolve(host: str, port: int) -> list[Address]:
    """The addresses `host` (a name or an address literal) resolves to; OSError if none."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


async def checked_address(url: httpx.URL, where: str, allow_private: bool, hop: int) -> Address:
    """The address to connect to for `url`: its host's first, once every one is allowed; a 400
    naming the field for a host that does not resolve or resolves to a non-public address."""
    host = url.host
    seen = f"The image URL's host {host!r}"
    if hop > 0:
        seen = f"The image URL redirects to {host!r}, which"
    try:
        addresses = await resolve(host, url.port or (443 if url.scheme == "https" else 80))
    except OSError as exc:
        raise bad_request(f"{seen} cannot be resolved ({exc}), field: '{where}'", where) from None
    if not addresses:
        raise bad_request(f"{seen} cannot be resolved, field: '{where}'", where)
    private = [a for a in addresses if not is_public(a)]
    if private and not allow_private:
        raise bad_request(
            f"{seen} resolves to a non-public address ({private[0]}: loopback, private, link-local,"
            " multicast or reserved); this server fetches images from public addresses only"
            f" unless started with {ALLOW_FLAG}, field: '{where}'",
            where,
        )
    return addresses[0]


async def fetch_image(url: str, where: str, allow_private: bool) -> bytes:
    """The URL's body, at most MAX_IMAGE_BYTES, within FETCH_TIMEOUT_S (redirects included)."""
    try:
        async with asyncio.timeout(FETCH_TIMEOUT_S):
            async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_S) as client:
                return await _follow(client, httpx.URL(url), where, allow_private)
    except TimeoutError:
        raise bad_request(
            f"Fetching the image took longer than {FETCH_TIMEOUT_S:g} s, field: '{where}'", where
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        raise bad_request(f"Fetching the image failed ({exc}), field: '{where}'", where) from None


async def _follow(client: httpx.AsyncClient, url: httpx.URL, where: str, allow: bool) -> bytes:
    for hop in range(MAX_REDIRECTS + 1):
        if url.scheme not in ("http", "https"):
            raise bad_request(
                f"The image URL redirects to a {url.scheme!r} URL, not http(s), field: '{where}'",
                where,
            )
        address = await checked_address(url, where, allow, hop)
        request = client.build_request(
            "GET",
            url.copy_with(host=str(address)),
            headers={"Host": url.netloc.decode("ascii")},
            extensions={"sni_hostname": url.host} if url.scheme == "https" else {},
        )
        response = await client.send(request, stream=True)
        try:
            if response.is_redirect:
                url = url.join(response.headers["location"])
                continue
            if response.status_code != 200:
                raise bad_request(
                    f"Fetching the image failed: HTTP {response.status_code}, field: '{where}'",
                    where,
                )
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_IMAGE_BYTES:
                    raise bad_request(too_big(where), where)
            return bytes(body)
        finally:
            await response.aclose()
    raise bad_request(
        f"The image URL redirects more than {MAX_REDIRECTS} times, field: '{where}'", where
    )
