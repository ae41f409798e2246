"""A tiny asyncio TCP proxy in front of the test broker, to take "Kafka" down and bring it back
without touching the broker the other tests share.

Kafka clients connect to the addresses the broker advertises, not to the bootstrap address, so the
proxy rewrites the broker addresses in Metadata responses to its own: every connection of a client
pointed at the proxy then goes through it. `stop()` closes the listener and cuts every connection
(the broker looks down); `start()` listens on the same port again.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any

from aiokafka.protocol.metadata import (
    MetadataResponse_v0,
    MetadataResponse_v1,
    MetadataResponse_v2,
    MetadataResponse_v3,
    MetadataResponse_v4,
    MetadataResponse_v5,
)

_METADATA = 3
_METADATA_RESPONSES = {
    cls.API_VERSION: cls
    for cls in (
        MetadataResponse_v0,
        MetadataResponse_v1,
        MetadataResponse_v2,
        MetadataResponse_v3,
        MetadataResponse_v4,
        MetadataResponse_v5,
    )
}


class KafkaProxy:
    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.partition(",")[0].rpartition(":")
        self.upstream_host, self.upstream_port = host, int(port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, up_writer}
        pending: dict[int, tuple[int, int]] = {}
        tasks = [
            asyncio.create_task(self._requests(client_reader, up_writer, pending)),
            asyncio.create_task(self._responses(up_reader, client_writer, pending)),
        ]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
                self._tasks.discard(task)
            for writer in (client_writer, up_writer):
                writer.transport.abort()
                self._writers.discard(writer)

    @staticmethod
    async def _frame(reader: asyncio.StreamReader) -> bytes:
        size = struct.unpack(">i", await reader.readexactly(4))[0]
        return await reader.readexactly(size)

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: dict[int, tuple[int, int]]
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                frame = await self._frame(reader)
                api_key, api_version, correlation_id = struct.unpack(">hhi", frame[:8])
                pending[correlation_id] = (api_key, api_version)
                writer.write(struct.pack(">i", len(frame)) + frame)
                await writer.drain()

    async def _responses(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: dict[int, tuple[int, int]]
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                frame = await self._frame(reader)
                correlation_id = struct.unpack(">i", frame[:4])[0]
                api_key, api_version = pending.pop(correlation_id, (-1, -1))
                if api_key == _METADATA and api_version in _METADATA_RESPONSES:
                    frame = frame[:4] + self._rewrite(_METADATA_RESPONSES[api_version], frame[4:])
                writer.write(struct.pack(">i", len(frame)) + frame)
                await writer.drain()

    def _rewrite(self, cls: Any, body: bytes) -> bytes:
        response = cls.decode(body)
        response.brokers = [(b[0], "127.0.0.1", self.port, *b[3:]) for b in response.brokers]
        encoded: bytes = response.encode()
        return encoded
