"""Tests for preprocess.fetch: SSRF refusals, redirects, the byte cap, timeouts, address rules.

All traffic stays on loopback. The image server listens on 127.0.0.2 (the one address the policy
exempts, as an operator would exempt an internal image store); a trap server listens on 127.0.0.1
at the same port, so any forbidden address that slipped through would land on it with the right
port, and its hit count must stay 0. Names are answered by `FakeResolver`; no real DNS is asked.
A guard on `socket.connect` refuses and records any connection to a non-loopback address, so that
even a broken fetcher cannot send a packet off this machine during the tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from preprocess.fetch import (
    FORBIDDEN_V4_NETWORKS,
    FORBIDDEN_V6_NETWORKS,
    FetchError,
    FetchPolicy,
    SafeFetcher,
    is_forbidden_address,
)

from .conftest import FakeResolver

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
ALLOWED = ("127.0.0.2/32",)

# --------------------------------------------------------------------------- network guard


@dataclass
class Connects:
    attempts: list[tuple[str, int]] = field(default_factory=list)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Connects:
    """Refuse (and record) every outgoing TCP connect; only loopback destinations go through."""
    seen = Connects()
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def allowed(address: Any) -> bool:
        if not isinstance(address, tuple):
            return True  # AF_UNIX and the like: not network traffic
        host = str(address[0]).split("%")[0]
        seen.attempts.append((host, int(address[1])))
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback

    def connect(self: socket.socket, address: Any) -> None:
        if not allowed(address):
            raise PermissionError(f"test guard: connection to {address} refused")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if not allowed(address):
            raise PermissionError(f"test guard: connection to {address} refused")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return seen


# --------------------------------------------------------------------------- fakes


def image_app(hits: Counter[str]) -> web.Application:
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        hits[request.path] += 1
        hits["total"] += 1
        response: web.StreamResponse = await handler(request)
        return response

    async def img(request: web.Request) -> web.Response:
        return web.Response(body=IMAGE, content_type="image/png")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5000, content_type="image/png")

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for _ in range(200):
                await resp.write(b"y" * 65536)
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading: what the cap is for
        return resp

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "10")))
        return web.Response(body=IMAGE)

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="nope")

    async def chain(request: web.Request) -> web.Response:
        # /r/n is n redirects away from the image; `delay` slows every hop.
        n = int(request.match_info["n"])
        delay = float(request.query.get("delay", "0"))
        await asyncio.sleep(delay)
        if n == 0:
            return web.Response(body=IMAGE, content_type="image/png")
        # Relative Locations: the fetcher must resolve them against the current URL.
        location = f"../r/{n - 1}" + (f"?delay={delay}" if delay else "")
        return web.Response(status=302, headers={"Location": location})

    async def to(request: web.Request) -> web.Response:
        return web.Response(status=int(request.query.get("code", "302")), headers={"Location": request.query["loc"]})

    async def gzip(request: web.Request) -> web.Response:
        return web.Response(body=b"\x1f\x8b" + b"\0" * 30, headers={"Content-Encoding": "gzip"})

    async def setcookie(request: web.Request) -> web.Response:
        resp = web.Response(status=302, headers={"Location": "/headers"})
        resp.set_cookie("session", "secret")
        return resp

    async def headers(request: web.Request) -> web.Response:
        text = "\n".join(f"{k.lower()}: {v}" for k, v in request.headers.items())
        return web.Response(text=text)

    app = web.Application(middlewares=[web.middleware(count)])
    app.router.add_get("/img", img)
    app.router.add_get("/big", big)
    app.router.add_get("/stream", stream)
    app.router.add_get("/slow", slow)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/r/{n}", chain)
    app.router.add_get("/to", to)
    app.router.add_get("/gzip", gzip)
    app.router.add_get("/setcookie", setcookie)
    app.router.add_get("/headers", headers)
    return app


def trap_app(hits: Counter[str]) -> web.Application:
    async def anything(request: web.Request) -> web.Response:
        hits["total"] += 1
        return web.Response(body=b"SECRET")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


@dataclass
class Net:
    port: int
    image_hits: Counter[str]
    trap_hits: Counter[str]

    def url(self, path: str, host: str = "img.test") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    image_hits: Counter[str] = Counter()
    trap_hits: Counter[str] = Counter()
    for _ in range(20):
        image = TestServer(image_app(image_hits), host="127.0.0.2")
        await image.start_server()
        assert image.port is not None
        trap = TestServer(trap_app(trap_hits), host="127.0.0.1", port=image.port)
        try:
            await trap.start_server()
        except OSError:
            await image.close()
            continue
        break
    else:
        pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")
    yield Net(image.port, image_hits, trap_hits)
    await trap.close()
    await image.close()


Table = dict[str, Sequence[Sequence[str]]]
BASE_TABLE: Table = {
    "img.test": [["127.0.0.2"]],
    "IMG.test": [["127.0.0.2"]],
    "loop.test": [["127.0.0.1"]],
    "private.test": [["10.0.0.1"]],
    "meta.test": [["169.254.169.254"]],
    "cgnat.test": [["100.64.0.1"]],
    "v6loop.test": [["::1"]],
    "mapped.test": [["::ffff:127.0.0.1"]],
    "zero.test": [["0.0.0.0"]],
    "mixed.test": [["127.0.0.1", "10.0.0.1", "::1", "127.0.0.2"]],
    "rebind.test": [["127.0.0.2"], ["127.0.0.1"]],
}

MakeFetcher = Callable[..., SafeFetcher]


@pytest.fixture
async def make_fetcher() -> AsyncIterator[MakeFetcher]:
    made: list[SafeFetcher] = []

    def make(table: Table | None = None, **policy: Any) -> SafeFetcher:
        policy.setdefault("max_bytes", 1 << 20)
        policy.setdefault("timeout_s", 5.0)
        policy.setdefault("allowed_networks", ALLOWED)
        fetcher = SafeFetcher(FetchPolicy(**policy), resolver=FakeResolver(dict(BASE_TABLE, **(table or {}))))
        made.append(fetcher)
        return fetcher

    yield make
    for fetcher in made:
        await fetcher.close()


def resolver_of(fetcher: SafeFetcher) -> FakeResolver:
    resolver = fetcher._resolver
    assert isinstance(resolver, FakeResolver)
    return resolver


async def refused(fetcher: SafeFetcher, url: str, match: str) -> FetchError:
    with pytest.raises(FetchError, match=match) as info:
        await fetcher.fetch(url)
    return info.value


# --------------------------------------------------------------------------- success, cap, status, timeout


async def test_fetch_through_a_name(net: Net, make_fetcher: MakeFetcher) -> None:
    fetcher = make_fetcher()
    assert await fetcher.fetch(net.url("/img")) == IMAGE
    assert await fetcher.fetch(net.url("/img", host="IMG.test")) == IMAGE
    assert net.image_hits["/img"] == 2
    assert net.trap_hits["total"] == 0


async def test_start_then_close_then_fetch_is_an_error(make_fetcher: MakeFetcher) -> None:
    fetcher = make_fetcher()
    await fetcher.start()
    await fetcher.close()
    await fetcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        await fetcher.fetch("http://img.test/img")


async def test_content_length_over_the_cap_is_refused_before_reading(net: Net, make_fetcher: MakeFetcher) -> None:
    err = await refused(make_fetcher(max_bytes=1000), net.url("/big"), r"5000 bytes \(Content-Length\), over the 1000")
    assert not err.retryable
    assert await make_fetcher(max_bytes=5000).fetch(net.url("/big")) == b"x" * 5000


async def test_chunked_body_over_the_cap_stops_reading(net: Net, make_fetcher: MakeFetcher) -> None:
    err = await refused(make_fetcher(max_bytes=100_000), net.url("/stream"), "over the 100000 byte limit")
    assert not err.retryable
    # Stopped within one chunk past the cap, never the 13 MB the server offered.
    assert "stopped after" in str(err)
    stopped = int(str(err).split("stopped after ")[1].split()[0])
    assert 100_000 < stopped <= 100_000 + 65536


@pytest.mark.parametrize(("code", "retryable"), [(404, False), (403, False), (500, True), (503, True), (429, True)])
async def test_non_2xx_status(net: Net, make_fetcher: MakeFetcher, code: int, retryable: bool) -> None:
    err = await refused(make_fetcher(), net.url(f"/status/{code}"), f"HTTP {code} from img.test")
    assert err.retryable is retryable


async def test_slow_server_times_out(net: Net, make_fetcher: MakeFetcher) -> None:
    start = time.monotonic()
    err = await refused(make_fetcher(timeout_s=0.3), net.url("/slow"), r"timed out after 0.3 s")
    assert err.retryable
    assert time.monotonic() - start < 2


async def test_timeout_covers_the_whole_redirect_chain(net: Net, make_fetcher: MakeFetcher) -> None:
    # Three hops of 0.2 s each: every hop is fast enough alone, the chain is not.
    await refused(make_fetcher(timeout_s=0.5), net.url("/r/2?delay=0.2"), "timed out")


async def test_compressed_response_is_refused_and_identity_requested(net: Net, make_fetcher: MakeFetcher) -> None:
    fetcher = make_fetcher()
    await refused(fetcher, net.url("/gzip"), "Content-Encoding 'gzip'")
    headers = (await fetcher.fetch(net.url("/headers"))).decode()
    assert "accept-encoding: identity" in headers
    assert "user-agent: mm-sidecar" in headers


async def test_cookies_are_not_kept(net: Net, make_fetcher: MakeFetcher) -> None:
    fetcher = make_fetcher()
    # The redirect sets a cookie, the next hop (and the next fetch) must not send it back.
    assert "cookie" not in (await fetcher.fetch(net.url("/setcookie"))).decode()
    assert "cookie" not in (await fetcher.fetch(net.url("/headers"))).decode()


# --------------------------------------------------------------------------- redirects


async def test_redirect_chain_within_the_limit(net: Net, make_fetcher: MakeFetcher) -> None:
    assert await make_fetcher(max_redirects=3).fetch(net.url("/r/3")) == IMAGE
    assert net.image_hits["total"] == 4  # /r/3 /r/2 /r/1 /r/0


async def test_too_many_redirects(net: Net, make_fetcher: MakeFetcher) -> None:
    err = await refused(make_fetcher(max_redirects=3), net.url("/r/4"), r"too many redirects \(more than 3\)")
    assert not err.retryable
    assert net.image_hits["/r/0"] == 0
    assert await make_fetcher(max_redirects=0).fetch(net.url("/r/0")) == IMAGE
    await refused(make_fetcher(max_redirects=0), net.url("/r/1"), "too many redirects")


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_every_redirect_code_is_followed(net: Net, make_fetcher: MakeFetcher, code: int) -> None:
    url = net.url(f"/to?code={code}&loc=/img")
    assert await make_fetcher().fetch(url) == IMAGE


@pytest.mark.parametrize("host", ["127.0.0.1", "loop.test", "mapped.test", "[::ffff:127.0.0.1]", "2130706433"])
async def test_redirect_to_the_forbidden_server_is_refused(
    net: Net, make_fetcher: MakeFetcher, loopback_only: Connects, host: str
) -> None:
    target = f"http://{host}:{net.port}/secret"
    err = await refused(make_fetcher(), net.url(f"/to?loc={target}"), "redirect 1 to .*(forbidden|non-standard)")
    assert not err.retryable
    assert net.trap_hits["total"] == 0
    assert all(addr == "127.0.0.2" for addr, _ in loopback_only.attempts)


async def test_redirect_to_a_file_url_is_refused(net: Net, make_fetcher: MakeFetcher) -> None:
    await refused(make_fetcher(), net.url("/to?loc=file:///etc/passwd"), "scheme 'file' is not allowed")


async def test_rebinding_between_hops_of_one_fetch(net: Net, make_fetcher: MakeFetcher) -> None:
    # The same name, asked again for the redirect hop, now answers 127.0.0.1: each hop is re-checked.
    fetcher = make_fetcher()
    await refused(
        fetcher, net.url("/to?loc=/img", host="rebind.test"), r"resolves only to forbidden .*\(127\.0\.0\.1\)"
    )
    assert resolver_of(fetcher).calls == ["rebind.test", "rebind.test"]
    assert net.trap_hits["total"] == 0


# --------------------------------------------------------------------------- the resolver filter


@pytest.mark.parametrize(
    ("name", "address"),
    [
        ("loop.test", "127.0.0.1"),
        ("private.test", "10.0.0.1"),
        ("meta.test", "169.254.169.254"),
        ("cgnat.test", "100.64.0.1"),
        ("v6loop.test", "::1"),
        ("mapped.test", "::ffff:127.0.0.1"),
        ("zero.test", "0.0.0.0"),
    ],
)
async def test_names_resolving_to_forbidden_addresses(
    net: Net, make_fetcher: MakeFetcher, loopback_only: Connects, name: str, address: str
) -> None:
    err = await refused(
        make_fetcher(), net.url("/img", host=name), rf"{name} resolves only to forbidden addresses \({address}\)"
    )
    assert not err.retryable
    # Refused by the resolver filter: not one connect was attempted, loopback or not.
    assert loopback_only.attempts == []
    assert net.trap_hits["total"] == 0


async def test_dns_rebinding_between_fetches(net: Net, make_fetcher: MakeFetcher) -> None:
    fetcher = make_fetcher()
    assert await fetcher.fetch(net.url("/img", host="rebind.test")) == IMAGE
    # Same port on 127.0.0.1 is the trap: a connection that trusted a cached check would land there.
    await refused(
        fetcher, net.url("/img", host="rebind.test"), r"resolves only to forbidden addresses \(127\.0\.0\.1\)"
    )
    assert net.trap_hits["total"] == 0


async def test_mixed_answers_use_only_the_allowed_address(
    net: Net, make_fetcher: MakeFetcher, loopback_only: Connects
) -> None:
    assert await make_fetcher().fetch(net.url("/img", host="mixed.test")) == IMAGE
    assert net.trap_hits["total"] == 0
    assert {addr for addr, _ in loopback_only.attempts} == {"127.0.0.2"}


async def test_unknown_name_is_not_retryable(net: Net, make_fetcher: MakeFetcher) -> None:
    err = await refused(make_fetcher(), net.url("/img", host="nowhere.test"), "cannot resolve nowhere.test")
    assert not err.retryable


async def test_connection_refused_is_retryable(make_fetcher: MakeFetcher) -> None:
    # Port 1 on 127.0.0.2: allowed address, nothing listening.
    err = await refused(make_fetcher(), "http://img.test:1/img", "cannot connect to img.test")
    assert err.retryable


# --------------------------------------------------------------------------- URLs refused before any lookup


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("127.0.0.1", "forbidden"),
        ("127.1", "non-standard spelling"),
        ("2130706433", "non-standard spelling"),
        ("017700000001", "non-standard spelling"),
        ("0x7f.0.0.1", "non-standard spelling"),
        ("0x7f.1", "non-standard spelling"),
        ("0x7f000001", "non-standard spelling"),
        ("0177.0.0.1", "non-standard spelling"),
        ("127.0.0.01", "non-standard spelling"),
        ("127.0.0.1.", "non-standard spelling"),
        ("0", "non-standard spelling"),
        ("0.0.0.0", "forbidden"),
        ("10.0.0.1", "forbidden"),
        ("169.254.169.254", "forbidden"),
        ("[::1]", "forbidden"),
        ("[::]", "forbidden"),
        ("[::ffff:127.0.0.1]", "forbidden"),
        ("[::ffff:7f00:1]", "forbidden"),
        ("[::127.0.0.1]", "forbidden"),
        ("[64:ff9b::7f00:1]", "forbidden"),
        ("[2002:7f00:1::]", "forbidden"),
        ("[fe80::1%25lo]", "forbidden"),
        ("[fd00::1]", "forbidden"),
        ("%31%32%37.0.0.1", "non-standard spelling"),
        ("img.test%2f@evil.test", "user info"),
        ("evil%2etest", "not a valid host name"),
        ("evil test", "not a valid host name"),
    ],
)
async def test_ip_literals_in_every_spelling(
    net: Net, make_fetcher: MakeFetcher, loopback_only: Connects, host: str, why: str
) -> None:
    fetcher = make_fetcher()
    err = await refused(fetcher, f"http://{host}:{net.port}/img", why)
    assert not err.retryable
    assert resolver_of(fetcher).calls == []
    assert loopback_only.attempts == []
    assert net.trap_hits["total"] == 0


async def test_allowed_literal_is_fetched(net: Net, make_fetcher: MakeFetcher) -> None:
    assert await make_fetcher().fetch(f"http://127.0.0.2:{net.port}/img") == IMAGE


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("ftp://img.test/x.png", "scheme 'ftp'"),
        ("gopher://img.test/", "scheme 'gopher'"),
        ("data:image/png;base64,AAAA", "scheme 'data'"),
        ("/relative/path.png", "scheme ''"),
        ("http:///nohost", "no host"),
        ("http://img.test@evil.test/img", "user info"),
        ("http://user:pw@img.test/img", "user info"),
        ("http://:@img.test/img", "user info"),
        ("http://img.test:99999/img", "invalid URL"),
    ],
)
async def test_urls_refused_by_shape(make_fetcher: MakeFetcher, loopback_only: Connects, url: str, why: str) -> None:
    fetcher = make_fetcher()
    await refused(fetcher, url, why)
    assert resolver_of(fetcher).calls == []
    assert loopback_only.attempts == []


# --------------------------------------------------------------------------- allowed_hosts


async def test_allowed_hosts(net: Net, make_fetcher: MakeFetcher) -> None:
    table: Table = {
        name: [["127.0.0.2"]]
        for name in (
            "images.example.com",
            "images.example.com.",
            "a.cdn.test",
            "a.b.cdn.test",
            "cdn.test",
            "evilcdn.test",
        )
    }
    fetcher = make_fetcher(table, allowed_hosts=("Images.Example.com", ".cdn.test"))
    assert await fetcher.fetch(net.url("/img", host="images.example.com")) == IMAGE
    assert await fetcher.fetch(net.url("/img", host="IMAGES.EXAMPLE.COM.")) == IMAGE
    assert await fetcher.fetch(net.url("/img", host="a.cdn.test")) == IMAGE
    assert await fetcher.fetch(net.url("/img", host="a.b.cdn.test")) == IMAGE
    for host in ("img.test", "cdn.test", "evilcdn.test", "example.com", "127.0.0.2"):
        await refused(fetcher, net.url("/img", host=host), f"'{host}' is not in allowed_hosts")
    # Redirects leave the allow-list at their peril.
    away = net.url("/img", host="img.test")
    await refused(fetcher, net.url(f"/to?loc={away}", host="a.cdn.test"), "redirect 1 to img.test: .*allowed_hosts")
    await refused(fetcher, f"http://a.cdn.test@img.test:{net.port}/img", "user info")
    assert "img.test" not in resolver_of(fetcher).calls


# --------------------------------------------------------------------------- policy


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_bytes": 1, "timeout_s": 0}, "timeout_s"),
        ({"max_bytes": 1, "max_redirects": -1}, "max_redirects"),
        ({"max_bytes": 1, "allowed_networks": ("10.0.0.1/8",)}, "allowed_networks"),
        ({"max_bytes": 1, "allowed_networks": ("nope",)}, "allowed_networks"),
        ({"max_bytes": 1, "allowed_hosts": ("",)}, "allowed_hosts"),
    ],
)
def test_policy_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FetchPolicy(**kwargs)


# --------------------------------------------------------------------------- is_forbidden_address

FORBIDDEN = [
    "0.0.0.0", "0.1.2.3", "10.0.0.1", "10.255.255.255", "100.64.0.1", "100.127.255.254", "127.0.0.1", "127.0.0.2",
    "127.255.255.255", "169.254.169.254", "169.254.0.1", "172.16.0.1", "172.31.255.255", "192.0.0.1", "192.0.0.9",
    "192.0.2.1", "192.168.1.1", "198.18.0.1", "198.19.255.255", "198.51.100.7", "203.0.113.9", "224.0.0.1",
    "239.255.255.250", "240.0.0.1", "255.255.255.255",
    "::", "::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1", "::10.0.0.1",
    "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b:1::1", "2002:7f00:1::", "2002:a9fe:a9fe::1", "2001::1",
    "2001:db8::1", "3fff::1", "100::1", "fc00::1", "fd12:3456::1", "fe80::1", "fe80::1%eth0", "febf::1", "fec0::1",
    "ff02::1", "ff0e::1", "::ffff:0:7f00:1", "5f00::1", "1::1",
]  # fmt: skip
ALLOWED_ADDRESSES = [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "100.63.255.255", "100.128.0.0", "172.15.255.255", "172.32.0.0",
    "192.167.255.255", "198.17.255.255", "198.20.0.0", "223.255.255.255",
    "2606:4700::1111", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1",
]  # fmt: skip


@pytest.mark.parametrize("address", FORBIDDEN)
def test_forbidden_addresses(address: str) -> None:
    assert is_forbidden_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED_ADDRESSES)
def test_public_addresses(address: str) -> None:
    assert not is_forbidden_address(ipaddress.ip_address(address))


def test_allowed_networks_exempt_their_addresses_and_embedded_forms() -> None:
    for address in ("127.0.0.2", "::ffff:127.0.0.2", "64:ff9b::7f00:2", "2002:7f00:2::"):
        assert not is_forbidden_address(ipaddress.ip_address(address), ALLOWED)
    for address in ("127.0.0.1", "127.0.0.3", "::ffff:127.0.0.1"):
        assert is_forbidden_address(ipaddress.ip_address(address), ALLOWED)
    assert not is_forbidden_address(ipaddress.ip_address("fd00::5"), [ipaddress.ip_network("fd00::/64")])


@st.composite
def address_in(draw: st.DrawFn, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> Any:
    net = draw(st.sampled_from(networks))
    return net.network_address + draw(st.integers(0, net.num_addresses - 1))


@given(address_in(FORBIDDEN_V4_NETWORKS))
def test_any_address_in_a_forbidden_v4_network_is_forbidden(ip: ipaddress.IPv4Address) -> None:
    assert is_forbidden_address(ip)


@given(address_in(FORBIDDEN_V6_NETWORKS))
def test_any_address_in_a_forbidden_v6_network_is_forbidden(ip: ipaddress.IPv6Address) -> None:
    assert is_forbidden_address(ip)


@given(st.ip_addresses(v=4), st.sampled_from([(), ALLOWED, ("10.0.0.0/8", "192.168.0.0/24")]))
def test_embedded_v4_forms_agree_with_their_v4_address(ip: ipaddress.IPv4Address, allowed: tuple[str, ...]) -> None:
    expected = is_forbidden_address(ip, allowed)
    value = int(ip)
    forms = [
        ipaddress.IPv6Address((0xFFFF << 32) | value),  # ::ffff:a.b.c.d
        ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | value),  # NAT64
        ipaddress.IPv6Address((0x2002 << 112) | (value << 80) | 1),  # 6to4
    ]
    for form in forms:
        assert is_forbidden_address(form, allowed) is expected, form
