"""A minimal keep-alive HTTP/1.1 client for load generators: a Python HTTP library would spend more
CPU per request than the endpoint being measured, on the same cores."""

from __future__ import annotations

import asyncio
import socket


def post(host: str, path: str, write_key: str, body: bytes) -> bytes:
    """The bytes of one JSON POST authorized with the write key."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {write_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request and read its whole answer; returns the status code."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(h[15:]) for h in head.split(b"\r\n") if h[:15].lower() == b"content-length:"), 0)
    await reader.readexactly(length)
    return int(head[9:12])
