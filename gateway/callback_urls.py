"""Callback URLs that reach only the public internet, checked at submission and at send.

A job's `callback_url` makes a worker send an HTTP request where the client says: without
checks, any key could make the workers call Triton's repository API, a cloud metadata
address or Redis. So:

- the URL must be `http(s)://` on an allowed port (`callback_ports`, 80 and 443 by
  default) with a DNS name whose last label is letters (so no address literal in any of
  its textual forms: decimal, octal, hex, short, IPv6; names ending in a dot are refused):
  the JSON schema states this pattern, and a literal address is refused with its reason;
- at submission, the name is resolved and refused (422, naming the reason) if any address
  it resolves to is loopback, private, link-local, multicast, reserved, unspecified or not
  publicly routable, IPv4-mapped, NAT64, 6to4 and Teredo addresses judged by the IPv4
  address they carry; a name that does not resolve yet is accepted (it is checked again);
- at send time, the worker resolves once, checks every address, and connects to the checked
  address (so a name that changes its answer in between, DNS rebinding, reaches nothing
  internal), following no redirects and reading a bounded answer (`gateway.webhooks`).

`callback_allow_networks` admits internal receivers on purpose (an operator's allowlist);
`callback_nameservers` names the DNS servers to ask (default: the system resolver).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.settings import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_PORTS = {"http": 80, "https": 443}
LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
PUBLIC_NAME = rf"(?:{LABEL}\.)+[A-Za-z]{{2,63}}"
NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class UnsafeCallback(ValueError):
    """A callback URL the forge will not call; the message says why."""


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4, Teredo), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if any(ip in net for net in NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def address_problem(ip: Address) -> str | None:
    """Why a callback must not reach `ip`, or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address) and (inner := embedded_ipv4(ip)) is not None:
        problem = address_problem(inner)
        return f"{problem} (carried by {ip})" if problem else None
    checks = (
        ("is_loopback", "a loopback address"),
        ("is_unspecified", "the unspecified address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
        ("is_private", "a private address"),
    )
    for attribute, problem in checks:
        if getattr(ip, attribute):
            return f"{ip} is {problem}"
    if not ip.is_global:
        return f"{ip} is not a publicly routable address"
    return None


def literal_address(host: str) -> Address | None:
    """The address a URL host spells, in any form the C library reads as one, or None."""
    bare = host.strip("[]").split("%")[0].rstrip(".")
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    try:  # 127.1, 0x7f000001, 017700000001, 2130706433, 0x7f.1: inet_aton reads them all
        return ipaddress.IPv4Address(socket.inet_aton(bare))
    except OSError:
        return None


@dataclass(frozen=True)
class Target:
    """Where a checked callback goes: scheme, host as written, port."""

    scheme: str
    host: str
    port: int


@dataclass(frozen=True)
class CallbackRules:
    """The checks above, configured by the settings."""

    ports: frozenset[int]
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    nameservers: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> CallbackRules:
        """The rules of a deployment."""
        return cls(
            frozenset(settings.callback_ports),
            tuple(ipaddress.ip_network(n, strict=False) for n in settings.callback_allow_networks),
            tuple(settings.callback_nameservers),
        )

    def allowed(self, ip: Address) -> bool:
        """Whether the operator's allowlist admits `ip`."""
        return any(ip in net for net in self.allow_networks)

    def pattern(self) -> str:
        """The JSON schema pattern of an acceptable callback URL."""
        literals = [
            re.escape(str(net.network_address))
            for net in self.allow_networks
            if net.num_addresses == 1 and net.version == 4
        ]
        host = "|".join([PUBLIC_NAME, *literals])
        ports = "|".join(str(p) for p in sorted(self.ports))
        schemes = [
            f"{scheme}://(?:{host})(?::(?:{ports})){'?' if default in self.ports else ''}"
            for scheme, default in DEFAULT_PORTS.items()
        ]
        return rf"^(?:{'|'.join(schemes)})(?:[/?#]\S*)?$"

    def check_text(self, url: str) -> Target:
        """The target of `url`, or UnsafeCallback naming what is wrong with its text."""
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS:
            raise UnsafeCallback(f"callback_url must be http or https, not {parts.scheme!r}")
        if parts.username is not None or parts.password is not None:
            raise UnsafeCallback("callback_url must not carry credentials")
        host = parts.hostname or ""
        try:
            port = parts.port or DEFAULT_PORTS[parts.scheme]
        except ValueError as exc:
            raise UnsafeCallback(f"callback_url has an invalid port: {exc}") from exc
        if port not in self.ports:
            raise UnsafeCallback(
                f"callback_url port {port} is not allowed; use {sorted(self.ports)}"
            )
        literal = literal_address(host)
        if literal is not None:
            self.check_address(host, literal)
        elif host.endswith("."):
            raise UnsafeCallback("callback_url host must not end with a dot")
        elif host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always loopback
            raise UnsafeCallback(f"callback_url host {host} is a loopback name")
        return Target(parts.scheme, host, port)

    def check_address(self, host: str, ip: Address) -> None:
        """UnsafeCallback unless `ip` is public or allowlisted."""
        problem = address_problem(ip)
        if problem is not None and not self.allowed(ip):
            raise UnsafeCallback(f"callback_url host {host}: {problem}")

    async def resolve(self, host: str, port: int) -> list[Address]:
        """Every address `host` resolves to (OSError if it does not resolve)."""
        literal = literal_address(host)
        if literal is not None:
            return [literal]
        if self.nameservers:
            return await self._ask_nameservers(host)
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [ipaddress.ip_address(info[4][0]) for info in infos]

    async def _ask_nameservers(self, host: str) -> list[Address]:
        import dns.asyncresolver
        import dns.exception
        import dns.nameserver

        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(*_host_port(ns)) for ns in self.nameservers
        ]
        found: list[Address] = []
        for kind in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(host, kind, lifetime=3.0)
            except dns.exception.DNSException:
                continue
            found += [ipaddress.ip_address(record.to_text()) for record in answer]
        if not found:
            raise OSError(f"{host} does not resolve")
        return found

    async def check_resolved(self, url: str) -> Target:
        """At submission: the text, then every address the name resolves to now (a name
        that does not resolve yet passes: the sender checks again)."""
        target = self.check_text(url)
        try:
            addresses = await self.resolve(target.host, target.port)
        except OSError:
            return target
        for ip in addresses:
            self.check_address(target.host, ip)
        return target

    async def pinned(self, url: str) -> tuple[Target, Address]:
        """At send time: the target and the one checked address to connect to."""
        target = self.check_text(url)
        try:
            addresses = await self.resolve(target.host, target.port)
        except OSError as exc:
            raise UnsafeCallback(f"callback_url host {target.host} does not resolve") from exc
        for ip in addresses:
            self.check_address(target.host, ip)
        return target, addresses[0]


def _host_port(nameserver: str) -> tuple[str, int]:
    host, _, port = nameserver.rpartition(":")
    return (host, int(port)) if host else (nameserver, 53)
