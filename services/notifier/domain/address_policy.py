"""Which addresses a customer-configured webhook may reach (SSRF guard, pure part).

Refused unless allow-listed by the operator: private (RFC 1918, ULA), loopback, link-local (which
includes cloud metadata at 169.254.169.254), shared (CGNAT), multicast, reserved and unspecified.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


class RefusedAddress(Exception):
    """The URL may not be called; the message fails with this reason (no retry)."""


def forbidden_reason(address: IpAddress) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return forbidden_reason(address.ipv4_mapped)
    checks = (
        ("loopback", address.is_loopback),
        ("link-local (metadata)", address.is_link_local),
        ("private", address.is_private),
        ("shared (CGNAT)", isinstance(address, ipaddress.IPv4Address) and address in _SHARED),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("reserved", address.is_reserved),
    )
    for name, hit in checks:
        if hit:
            return name
    return None


class AddressPolicy:
    def __init__(self, allow_list: Iterable[str] = ()) -> None:
        self.allowed_hosts: set[str] = set()
        self.allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allow_list:
            try:
                self.allowed_networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.allowed_hosts.add(entry.lower())

    def check_url(self, url: str) -> tuple[str, str, int]:
        """(scheme, host, port) of a URL this service may call at all, before resolving."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise RefusedAddress(f"scheme {parts.scheme or '(none)'!r} not allowed (http/https only)")
        host = (parts.hostname or "").lower()
        if not host:
            raise RefusedAddress("URL has no host")
        if parts.username or parts.password:
            raise RefusedAddress("credentials in URLs are not allowed")
        if host in _METADATA_HOSTS and host not in self.allowed_hosts:
            raise RefusedAddress(f"{host} is a metadata endpoint")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise RefusedAddress("invalid port") from exc
        return parts.scheme, host, port

    def check_address(self, host: str, address: IpAddress) -> None:
        if host in self.allowed_hosts or any(address in net for net in self.allowed_networks):
            return
        reason = forbidden_reason(address)
        if reason is not None:
            raise RefusedAddress(f"{host} resolves to {address}, a {reason} address")
