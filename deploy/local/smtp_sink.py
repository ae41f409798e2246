"""A local SMTP server that keeps every mail it receives (the `make run` stand-in for a mail provider).

    python -m deploy.local.smtp_sink --port 2525          # serve on 127.0.0.1:2525, save to var/mail/
    python -m deploy.local.smtp_sink --list               # one line per saved mail
    python -m deploy.local.smtp_sink --show <file|index>  # print one mail

Each mail is saved as `var/mail/<time>-<n>.eml` (open it in any mail client). Tests start it in-process
with `await MailSink.start(port=0)` and read `sink.messages`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import itertools
import sys
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "var" / "mail"


@dataclass
class ReceivedMail:
    envelope_from: str
    envelope_to: list[str]
    message: EmailMessage
    raw: bytes
    path: Path | None = None


@dataclass
class MailSink:
    """The aiosmtpd handler: keeps mails in memory and (optionally) as .eml files."""

    directory: Path | None = None
    # Recipients answered with 550 (to exercise bounces) and how many next DATA commands get a 451.
    reject: set[str] = field(default_factory=set)
    fail_next: int = 0
    messages: list[ReceivedMail] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None
    _counter: itertools.count[int] = field(default_factory=itertools.count)
    port: int = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.lower() in self.reject:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.fail_next > 0:
            self.fail_next -= 1
            return "451 4.3.0 try again later"
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode()
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        mail = ReceivedMail(str(envelope.mail_from), list(envelope.rcpt_tos), parsed, raw)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            mail.path = self.directory / f"{time.strftime('%Y%m%dT%H%M%S')}-{next(self._counter):06d}.eml"
            mail.path.write_bytes(raw)
        self.messages.append(mail)
        return "250 Message accepted"

    @classmethod
    async def start(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        directory: Path | None = None,
        server_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> MailSink:
        """`server_options` go to aiosmtpd's `SMTP` (tests: STARTTLS, required authentication, a server
        without SMTPUTF8)."""
        sink = cls(directory=directory, **options)
        loop = asyncio.get_running_loop()
        sink._server = await loop.create_server(
            lambda: SMTP(
                sink,
                **{
                    "hostname": "clm-smtp-sink",
                    "enable_SMTPUTF8": True,
                    "data_size_limit": 25 * 2**20,
                    **(server_options or {}),
                },
            ),
            host=host,
            port=port,
        )
        sink.port = sink._server.sockets[0].getsockname()[1]
        return sink

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    def to(self, address: str) -> list[ReceivedMail]:
        return [m for m in self.messages if address in m.envelope_to]


def saved_mails(directory: Path = DEFAULT_DIR) -> list[Path]:
    return sorted(directory.glob("*.eml")) if directory.exists() else []


def _summary(path: Path) -> str:
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    return f"{path.name}  to={parsed.get('To', '')}  subject={parsed.get('Subject', '')}"


async def _serve(host: str, port: int, directory: Path) -> None:
    sink = await MailSink.start(host, port, directory)
    print(f"SMTP sink on {host}:{sink.port}, saving to {directory}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sink.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--list", action="store_true", help="list saved mails and exit")
    parser.add_argument("--show", help="print one saved mail (file name or index from --list) and exit")
    args = parser.parse_args(argv)
    if args.list:
        for i, path in enumerate(saved_mails(args.dir)):
            print(f"{i:>4}  {_summary(path)}")
        return 0
    if args.show is not None:
        paths = saved_mails(args.dir)
        chosen = paths[int(args.show)] if args.show.isdigit() else args.dir / args.show
        sys.stdout.write(chosen.read_bytes().decode(errors="replace"))
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
