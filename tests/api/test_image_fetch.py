"""The guard on image URLs the server fetches (girandole.api.serving.image_fetch): non-public
addresses refused unless allowed, each redirect's target checked again, and the connection made
to the address that was checked. A real HTTP server on loopback, fetched by the real code."""

from __future__ import annotations

import asyncio
import ipaddress

import httpx
import pytest
from loopback import serve_in_thread
from starlette.applications import Starlette
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from girandole.api.http.errors import APIError
from girandole.api.serving.image_fetch import (
    MAX_REDIRECTS,
    checked_address,
    fetch_image,
    is_public,
)

WHERE = "messages.0.content.0.image_url.url"


@pytest.fixture(scope="module")
def site():
    """A loopback server: /image (bytes, and the Host header it got), /hop/{n} (redirects n
    times, then to /image), /to/{url} (a redirect to the URL)."""
    hosts: list[str] = []

    async def image(request):
        hosts.append(request.headers["host"])
        return Response(b"\x89PNG fake", media_type="image/png")

    async def hop(request):
        n = int(request.path_params["n"])
        return RedirectResponse("/image" if n == 0 else f"/hop/{n - 1}")

    async def to(request):
        return RedirectResponse(request.query_params["url"])

    app = Starlette(routes=[Route("/image", image), Route("/hop/{n}", hop), Route("/to", to)])
    server, thread, url = serve_in_thread(app)
    yield url, hosts
    server.should_exit = True
    thread.join()


def _fetch(url: str, allow_private: bool) -> bytes:
    return asyncio.run(fetch_image(url, WHERE, allow_private))


def _refused(url: str, allow_private: bool = False) -> APIError:
    with pytest.raises(APIError) as info:
        _fetch(url, allow_private)
    assert info.value.status_code == 400 and info.value.param == WHERE
    return info.value


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # the cloud metadata service
        ("100.64.0.1", False),  # shared address space (carrier NAT)
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),  # reserved
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:8.8.8.8", True),
    ],
)
def test_which_addresses_are_public(address, public):
    assert is_public(ipaddress.ip_address(address)) is public


def test_a_loopback_url_is_refused_by_default_and_fetched_when_allowed(site):
    url, hosts = site
    before = len(hosts)
    err = _refused(url + "/image")
    assert "non-public address (127.0.0.1" in err.message
    assert "--allow-private-image-urls" in err.message and WHERE in err.message
    for name in ("localhost", "[::ffff:127.0.0.1]", "127.1", "2130706433", "0"):
        _refused(url.replace("127.0.0.1", name) + "/image")
    assert "Invalid port" in _refused("http://[::1/x.png").message  # was a 500
    assert len(hosts) == before  # refused before any connection
    assert _fetch(url + "/image", allow_private=True) == b"\x89PNG fake"


def test_the_connection_goes_to_the_checked_address_with_the_name_as_host(site):
    url, hosts = site
    named = url.replace("127.0.0.1", "localhost")
    assert _fetch(named + "/image", allow_private=True) == b"\x89PNG fake"
    assert hosts[-1] == named.removeprefix("http://")  # the Host header keeps the name


def test_redirects_are_followed_checked_and_limited(site):
    url, _ = site
    assert _fetch(f"{url}/hop/{MAX_REDIRECTS - 1}", allow_private=True) == b"\x89PNG fake"
    err = _refused(f"{url}/hop/{MAX_REDIRECTS}", allow_private=True)
    assert f"more than {MAX_REDIRECTS} times" in err.message
    err = _refused(f"{url}/to?url=ftp://example.com/a.png", allow_private=True)
    assert "'ftp' URL, not http(s)" in err.message


def test_a_redirect_target_is_checked_as_the_first_url_is():
    """Offline there is no public host to redirect from: the check each redirect target gets
    (hop > 0) is called here as _follow calls it."""
    for target in ("http://127.0.0.1:9/a.png", "http://169.254.169.254/latest/meta-data"):
        with pytest.raises(APIError) as info:
            asyncio.run(checked_address(httpx.URL(target), WHERE, False, hop=1))
        assert "The image URL redirects to" in info.value.message
        assert "non-public address" in info.value.message
    public = asyncio.run(checked_address(httpx.URL("http://8.8.8.8/a.png"), WHERE, False, 1))
    assert str(public) == "8.8.8.8"


def test_the_setting_comes_from_the_flag_or_its_variable(monkeypatch):
    import argparse

    from girandole.api.server import add_serve_parser, settings_from_args

    def parse(*argv):
        parser = argparse.ArgumentParser()
        add_serve_parser(parser.add_subparsers())
        return settings_from_args(parser.parse_args(["serve", *argv])).allow_private_image_urls

    assert parse() is False
    assert parse("--allow-private-image-urls") is True
    monkeypatch.setenv("GIRANDOLE_ALLOW_PRIVATE_IMAGE_URLS", "1")
    assert parse() is True
    monkeypatch.setenv("GIRANDOLE_ALLOW_PRIVATE_IMAGE_URLS", "no")
    assert parse() is False
    monkeypatch.setenv("GIRANDOLE_ALLOW_PRIVATE_IMAGE_URLS", "maybe")
    with pytest.raises(SystemExit, match="GIRANDOLE_ALLOW_PRIVATE_IMAGE_URLS"):
        parse()
