"""Fetching remote images without letting a client reach private addresses (SSRF) or exhaust memory.

`SafeFetcher.fetch(url)` returns at most `FetchPolicy.max_bytes` bytes from an http(s) URL, or raises
`FetchError` saying why not. The rules, applied to the first URL and again to every redirect hop:

- scheme http or https only; no user info (`http://allowed.example@evil.test/` is the classic
  allow-list bypass); any port;
- the host is a name, a canonical dotted-quad IPv4 address or a bracketed IPv6 address. A numeric
  host in any other spelling (`127.1`, `2130706433`, `0x7f.0.0.1`, `0177.0.0.1`, `127.0.0.1.`) is
  refused outright: the C resolver, the URL parser and aiohttp each read those differently, and
  nobody serves images from them, so refusing is safer than guessing which reading wins;
- when `allowed_hosts` is set, the host must be listed (exact, case-insensitive) or fall under a
  leading-dot entry (`.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`);
- the address the connection uses must not be forbidden (`is_forbidden_address`). aiohttp skips the
  resolver for IP literals, so literals are checked here; names are checked inside the connector's
  resolver (`_FilteringResolver`), which drops forbidden answers before aiohttp sees them. aiohttp
  connects only to what the resolver returned, so there is no window between check and connect in
  which DNS can answer differently (rebinding). The DNS cache is off and every request opens a fresh
  connection (`force_close`), so each hop is resolved and checked on its own.

Forbidden addresses (any address in `allowed_networks` is exempt: operators' internal image stores):

IPv4: 0.0.0.0/8 (unspecified, "this network"), 10.0.0.0/8, 100.64.0.0/10 (CGNAT), 127.0.0.0/8,
169.254.0.0/16 (link-local, cloud metadata at 169.254.169.254), 172.16.0.0/12, 192.0.0.0/24 (IETF
protocol assignments), 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 (documentation), 192.88.99.0/24
(6to4 relay anycast), 192.168.0.0/16, 198.18.0.0/15 (benchmarking), 224.0.0.0/4 (multicast),
240.0.0.0/4 (reserved, including 255.255.255.255), plus anything `ipaddress` calls private, loopback,
link-local, multicast, reserved, unspecified or not global.

IPv6: ::/128, ::1/128, ::ffff:0:0:0/96 (SIIT), 64:ff9b:1::/48 (local-use NAT64), 100::/64 (discard),
2001::/23 (IETF protocol assignments, Teredo included), 2001:db8::/32 and 3fff::/20 (documentation),
fc00::/7 (unique local), fec0::/10 (site-local), fe80::/10 (link-local), ff00::/8 (multicast), plus
the same `ipaddress` properties (which leave only 2000::/3 global unicast). Addresses that carry an
IPv4 address are judged by that address alone: IPv4-mapped ::ffff:0:0/96, IPv4-compatible ::/96,
NAT64 64:ff9b::/96 and 6to4 2002::/16 (a socket connecting to them reaches, or is routed by, that
IPv4 address).

Memory: a Content-Length above the cap is refused before the body is read; otherwise the body is
read in chunks and reading stops as soon as the total passes the cap, so at most `max_bytes` plus one
chunk is ever buffered. Responses are not decompressed (`Accept-Encoding: identity`,
`auto_decompress=False`): the cap then counts exactly the bytes returned, and a gzip bomb cannot
inflate behind it. Image formats are compressed already, so nothing is lost; a server that encodes
anyway is refused rather than handed to the decoder as garbage.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

__all__ = [
    "FORBIDDEN_V4_NETWORKS",
    "FORBIDDEN_V6_NETWORKS",
    "FetchError",
    "FetchPolicy",
    "SafeFetcher",
    "is_forbidden_address",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

FORBIDDEN_V4_NETWORKS: tuple[ipaddress.IPv4Network, ...] = tuple(
    _V4(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
FORBIDDEN_V6_NETWORKS: tuple[ipaddress.IPv6Network, ...] = tuple(
    _V6(n)
    for n in (
        "::/128",
        "::1/128",
        "::ffff:0:0:0/96",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "3fff::/20",
        "fc00::/7",
        "fec0::/10",
        "fe80::/10",
        "ff00::/8",
    )
)
# Ranges whose addresses embed an IPv4 address (the mapped and compatible forms have properties on
# IPv6Address or are simple enough to test by value; these two are not).
_NAT64 = _V6("64:ff9b::/96")
_6TO4 = _V6("2002::/16")

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")
_HEX_LABEL = re.compile(r"0x[0-9a-f]*")
_HEADERS = {"User-Agent": "mm-sidecar", "Accept-Encoding": "identity"}


class FetchError(ValueError):
    """A remote image that could not be fetched; the message says why.

    `retryable` is True where the same request might succeed later (timeouts, connection failures,
    5xx and 429 answers) and False for refusals by policy and for client-side errors.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """What a fetch may do. `allowed_hosts` entries are host names or IP literals (IDNs in their
    `xn--` form), stored lower-case without a trailing dot; `allowed_networks` are CIDRs exempt from
    the forbidden-address rule, parsed once into `networks`."""

    max_bytes: int
    timeout_s: float = 10.0
    max_redirects: int = 3
    allowed_hosts: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes: must be > 0, got {self.max_bytes}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects: must be >= 0, got {self.max_redirects}")
        hosts = tuple(normalize_host_entry(h) for h in self.allowed_hosts)
        networks: list[IPNetwork] = []
        for cidr in self.allowed_networks:
            try:
                networks.append(ipaddress.ip_network(cidr))
            except ValueError as exc:
                raise ValueError(f"allowed_networks: {cidr!r} is not a network ({exc})") from None
        object.__setattr__(self, "allowed_hosts", hosts)
        object.__setattr__(self, "networks", tuple(networks))


def is_forbidden_address(ip: IPAddress, allowed_networks: Iterable[str | IPNetwork] = ()) -> bool:
    """True when a connection to `ip` could reach something private (see the module docstring).

    An address inside one of `allowed_networks` is never forbidden; IPv6 forms that embed an IPv4
    address are judged by the embedded address (with the same exemptions).
    """
    networks = [n if isinstance(n, _V4 | _V6) else ipaddress.ip_network(n) for n in allowed_networks]
    return _forbidden(ip, networks)


def _forbidden(ip: IPAddress, allowed: list[IPNetwork]) -> bool:
    # Comparing an address with a network of the other family is False, not an error.
    if any(ip in net for net in allowed):
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        if any(ip in net for net in FORBIDDEN_V4_NETWORKS):
            return True
    else:
        if any(ip in net for net in FORBIDDEN_V6_NETWORKS):
            return True
        embedded = _embedded_v4(ip)
        if embedded is not None:
            return _forbidden(embedded, allowed)
    # The explicit lists are the contract; the properties catch whatever a newer registry adds.
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    value = int(ip)
    if value < 1 << 32 or ip in _NAT64:
        # IPv4-compatible (::a.b.c.d) or NAT64: the low 32 bits are the IPv4 address.
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


class _ForbiddenAddress(OSError):
    """Raised by the resolver when every answer is forbidden. An OSError so that aiohttp wraps it in
    ClientConnectorDNSError (keeping it as `os_error`) instead of treating it as a bug."""


class _FilteringResolver(AbstractResolver):
    """Wraps a resolver and removes forbidden addresses from its answers."""

    def __init__(self, inner: AbstractResolver, networks: list[IPNetwork], *, owns_inner: bool) -> None:
        self._inner = inner
        self._networks = networks
        self._owns_inner = owns_inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        kept: list[ResolveResult] = []
        refused: list[str] = []
        for answer in answers:
            try:
                ip = ipaddress.ip_address(answer["host"])
            except ValueError:
                # Not an address we can judge: fail closed.
                refused.append(answer["host"])
                continue
            if _forbidden(ip, self._networks):
                refused.append(answer["host"])
            else:
                kept.append(answer)
        if not kept:
            if not refused:
                # aiohttp asserts on an empty answer; say what happened instead.
                raise OSError(f"{host} resolves to no address")
            raise _ForbiddenAddress(f"{host} resolves only to forbidden addresses ({', '.join(refused)})")
        return kept

    async def close(self) -> None:
        if self._owns_inner:
            await self._inner.close()


class SafeFetcher:
    """Fetches images under a `FetchPolicy`. One aiohttp session per fetcher, created in the running
    loop on `start()` or the first `fetch()`; `close()` releases it."""

    def __init__(self, policy: FetchPolicy, *, resolver: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None
        self._filter: _FilteringResolver | None = None
        self._closed = False

    @property
    def policy(self) -> FetchPolicy:
        return self._policy

    async def start(self) -> None:
        self._ensure_session()

    async def close(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        resolver, self._filter = self._filter, None
        if session is not None:
            await session.close()
        if resolver is not None:
            await resolver.close()

    async def fetch(self, url: str) -> bytes:
        """The body of `url` (following redirects), or FetchError."""
        session = self._ensure_session()
        try:
            current = URL(url)
        except (ValueError, TypeError) as exc:
            raise FetchError(f"invalid URL ({exc})") from None
        try:
            async with asyncio.timeout(self._policy.timeout_s):
                for hop in range(self._policy.max_redirects + 1):
                    try:
                        result = await self._hop(session, current)
                    except FetchError as exc:
                        if hop == 0:
                            raise
                        raise FetchError(
                            f"redirect {hop} to {current.raw_host}: {exc}", retryable=exc.retryable
                        ) from exc
                    if isinstance(result, bytes):
                        return result
                    current = result
        except TimeoutError:
            raise FetchError(f"fetch timed out after {self._policy.timeout_s:g} s", retryable=True) from None
        raise FetchError(f"too many redirects (more than {self._policy.max_redirects})")

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("SafeFetcher is closed")
        if self._session is None:
            # No await between the check and the assignment, so concurrent first fetches share one.
            owns = self._resolver is None
            inner = self._resolver if self._resolver is not None else aiohttp.DefaultResolver()
            self._filter = _FilteringResolver(inner, list(self._policy.networks), owns_inner=owns)
            connector = aiohttp.TCPConnector(resolver=self._filter, use_dns_cache=False, force_close=True)
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                headers=_HEADERS,
                auto_decompress=False,
                # Proxies from the environment would connect on our behalf to unchecked addresses.
                trust_env=False,
                # The whole fetch is bounded by asyncio.timeout in fetch(); no second clock here.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None),
            )
        return self._session

    async def _hop(self, session: aiohttp.ClientSession, url: URL) -> bytes | URL:
        """One request: the body, or the URL a redirect points to."""
        host = self._check_url(url)
        try:
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status in _REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        raise FetchError(f"HTTP {resp.status} redirect from {host} without a Location header")
                    try:
                        return url.join(URL(location))
                    except (ValueError, TypeError) as exc:
                        raise FetchError(f"invalid redirect Location from {host} ({exc})") from None
                if not 200 <= resp.status < 300:
                    retryable = resp.status >= 500 or resp.status == 429
                    raise FetchError(f"HTTP {resp.status} from {host}", retryable=retryable)
                return await self._read_capped(resp, host)
        except aiohttp.ClientConnectorError as exc:
            raise _connect_error(exc, host) from exc
        except aiohttp.InvalidURL as exc:
            raise FetchError(f"invalid URL for {host} ({exc})") from exc
        except aiohttp.ClientError as exc:
            raise FetchError(f"fetching from {host} failed ({type(exc).__name__}: {exc})", retryable=True) from exc

    async def _read_capped(self, resp: aiohttp.ClientResponse, host: str) -> bytes:
        cap = self._policy.max_bytes
        encoding = resp.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchError(f"{host} sent Content-Encoding {encoding!r} although identity was requested")
        length = resp.content_length
        if length is not None and length > cap:
            raise FetchError(f"image from {host} is {length} bytes (Content-Length), over the {cap} byte limit")
        chunks: list[bytes] = []
        total = 0
        # iter_chunked never yields more than _CHUNK bytes, so at most cap + _CHUNK is held.
        async for chunk in resp.content.iter_chunked(_CHUNK):
            total += len(chunk)
            if total > cap:
                raise FetchError(f"image from {host} is over the {cap} byte limit (stopped after {total} bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_url(self, url: URL) -> str:
        """Refuse what can be refused from the URL alone; returns the host for messages."""
        if url.scheme not in ("http", "https"):
            raise FetchError(f"URL scheme {url.scheme!r} is not allowed (only http and https)")
        host = url.raw_host
        if not url.is_absolute() or not host:
            raise FetchError("URL has no host")
        if url.raw_user is not None or url.raw_password is not None:
            raise FetchError("URLs with user info (user@host) are not allowed")
        literal = _ip_literal(url)
        if literal is not None:
            if _forbidden(literal, list(self._policy.networks)):
                raise FetchError(f"address {literal} is forbidden (private, loopback, link-local or reserved)")
            name = str(literal)
        else:
            name = host.rstrip(".")
        if self._policy.allowed_hosts and not host_allowed(name, self._policy.allowed_hosts):
            raise FetchError(f"host {name!r} is not in allowed_hosts")
        return name


def _ip_literal(url: URL) -> IPAddress | None:
    """The address of a literal host, None for a name; FetchError for what is neither."""
    raw = url.raw_host or ""
    if ":" in raw:
        # yarl has validated the brackets; `host` has the zone id (%25eth0) decoded for ipaddress.
        try:
            return ipaddress.IPv6Address(url.host or "")
        except ValueError as exc:
            raise FetchError(f"invalid IPv6 host ({exc})") from None
    labels = raw.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    last = labels[-1]
    # The WHATWG URL rule: a host whose last label is a number is an IPv4 address, in whatever
    # base and with however many parts; only the canonical spelling is accepted here.
    if last.isascii() and (last.isdigit() or _HEX_LABEL.fullmatch(last)):
        try:
            ip = ipaddress.IPv4Address(raw)
        except ValueError:
            ip = None
        if ip is None or str(ip) != raw:
            raise FetchError(f"numeric host {raw!r} in a non-standard spelling is not allowed (write a.b.c.d)")
        return ip
    if _HOST_NAME.fullmatch(raw) is None:
        raise FetchError(f"host {raw!r} is not a valid host name")
    return None


def normalize_host(host: str) -> str:
    """The one spelling hosts are compared in: lower case, no brackets or trailing dot, IPs canonical."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def normalize_host_entry(entry: str) -> str:
    """An `allowed_hosts` entry in `normalize_host`'s form; a leading dot (`.example.com`) is kept."""
    if not isinstance(entry, str) or not entry.strip().strip("[].").strip():
        raise ValueError(f"allowed_hosts: empty entry {entry!r}")
    entry = entry.strip()
    if entry.startswith(".") and len(entry) > 1:
        return "." + normalize_host(entry[1:])
    return normalize_host(entry)


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Exact match, or a leading-dot entry for any subdomain; entries are in `normalize_host_entry` form.

    The sidecar's URL check and the fetcher's (on every redirect hop) both call this, so an entry
    such as `[2001:db8::1]` means the same in both.
    """
    host = normalize_host(host)
    return any(host == entry or (entry.startswith(".") and host.endswith(entry)) for entry in allowed)


def _connect_error(exc: aiohttp.ClientConnectorError, host: str) -> FetchError:
    cause = exc.os_error
    if isinstance(cause, _ForbiddenAddress):
        return FetchError(str(cause))
    if isinstance(exc, aiohttp.ClientSSLError):
        return FetchError(f"TLS error with {host} ({exc})")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        # A name that does not exist will not exist on retry; a resolver that is down may recover.
        transient = isinstance(cause, socket.gaierror) and cause.errno == socket.EAI_AGAIN
        return FetchError(f"cannot resolve {host} ({cause.strerror or cause})", retryable=transient)
    return FetchError(f"cannot connect to {host} ({cause.strerror or cause})", retryable=True)
