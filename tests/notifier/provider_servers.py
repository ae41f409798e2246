"""Local HTTP servers that speak provider shapes (Twilio Messages, FCM v1, a webhook receiver), and
an SMTP server whose every answer can be scripted.

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


@dataclass
class ScriptedSmtp:
    """An SMTP server on loopback that answers each command by its verb from `answers` (`EHLO`,
    `HELO`, `STARTTLS`, `AUTH`, `MAIL`, `RCPT`, `DATA`, and `DATA.` for the end of the message) and
    opens with `greeting`, closing at once when that is a refusal: a relay refusing us at any stage,
    which aiosmtpd (`MailSink`) cannot script before RCPT. Records every command line received."""

    greeting: str = "220 scripted ESMTP"
    # Advertised in the EHLO answer (when `answers` has no EHLO).
    extensions: tuple[str, ...] = ("8BITMIME",)
    answers: dict[str, str] = field(default_factory=dict)
    # Closes the connection instead of answering `DATA` (before its 354) or `DATA.` (the body read,
    # before its answer): a relay restarting or dropping us mid-conversation.
    hangs_up_at: str | None = None
    commands: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.AbstractServer | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> ScriptedSmtp:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def verbs(self) -> list[str]:
        return [c.split(b" ", 1)[0].decode().upper() for c in self.commands]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.connections += 1

        async def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        try:
            await say(self.greeting)
            if not self.greeting.startswith("2"):
                return
            while True:
                line = (await reader.readuntil(b"\r\n"))[:-2]
                self.commands.append(line)
                verb = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
                if verb == "EHLO" and "EHLO" not in self.answers:
                    lines = ["scripted", *self.extensions]
                    for n, text in enumerate(lines):
                        await say(f"250{' ' if n == len(lines) - 1 else '-'}{text}")
                    continue
                if verb == "DATA":
                    if self.hangs_up_at == "DATA":
                        return
                    answer = self.answers.get("DATA", "354 go ahead")
                    await say(answer)
                    if answer.startswith("354"):
                        self.messages.append(await reader.readuntil(b"\r\n.\r\n"))
                        if self.hangs_up_at == "DATA.":
                            return
                        await say(self.answers.get("DATA.", "250 2.0.0 queued"))
                    continue
                if verb == "QUIT":
                    await say("221 bye")
                    return
                default = {"STARTTLS": "454 4.7.0 TLS not available", "AUTH": "235 2.7.0 ok"}
                await say(self.answers.get(verb, default.get(verb, "250 OK")))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
