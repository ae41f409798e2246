"""Local HTTP servers that speak provider shapes (Twilio Messages, FCM v1, a webhook receiver).

A minimal HTTP/1.1 server on asyncio streams (keep-alive, Content-Length bodies): enough for httpx,
fast enough for the benchmark, and each response can be scripted (`fail_next`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import orjson


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float = field(default_factory=time.monotonic)

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode()).items()}

    def json(self) -> object:
        return orjson.loads(self.body)


Response = tuple[int, bytes, dict[str, str]]


@dataclass
class ProviderServer:
    """Answers every request with the next scripted response, else with `default(request)`."""

    default: Callable[[RecordedRequest], Response]
    requests: list[RecordedRequest] = field(default_factory=list)
    scripted: list[Response] = field(default_factory=list)
    record: bool = True
    port: int = 0
    _server: asyncio.AbstractServer | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    served: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, *responses: Response) -> None:
        self.scripted.extend(responses)

    async def start(self) -> ProviderServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = RecordedRequest(method, path, headers, body)
                if self.record:
                    self.requests.append(request)
                self.served += 1
                status, payload, extra = self.scripted.pop(0) if self.scripted else self.default(request)
                out = [
                    f"HTTP/1.1 {status} X",
                    f"Content-Length: {len(payload)}",
                    "Content-Type: application/json",
                ]
                out += [f"{k}: {v}" for k, v in extra.items()]
                writer.write(("\r\n".join(out) + "\r\n\r\n").encode() + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


_ids = itertools.count(1)


def twilio_ok(request: RecordedRequest) -> Response:
    sid = f"SM{next(_ids):032d}"
    return 201, orjson.dumps({"sid": sid, "status": "queued"}), {}


def fcm_ok(request: RecordedRequest) -> Response:
    return 200, orjson.dumps({"name": f"projects/p/messages/{next(_ids)}"}), {}


def webhook_ok(request: RecordedRequest) -> Response:
    return 204, b"", {}


def error(status: int, message: str = "error") -> Response:
    return status, orjson.dumps({"message": message}), {}
