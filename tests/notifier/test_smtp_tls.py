"""SMTP to a real mail server's setup: STARTTLS (port 587) with the server's certificate verified
against a private CA, then authentication; credentials never go out in clear to a remote host."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword
from pydantic import ValidationError

from deploy.local.smtp_sink import MailSink
from services.notifier.settings import NotifierSettings, ProviderConfig
from tests.notifier.test_email import email_request, setup


async def test_mail_goes_over_starttls_with_authentication(start_notifier, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_tls)
    logins: list[tuple[bytes, bool]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"clm", b"s3cret-pass")
        logins.append((data.login if isinstance(data, LoginPassword) else b"", session.ssl is not None))
        return AuthResult(success=ok)

    server = await MailSink.start(
        server_options={
            "tls_context": server_tls,
            "require_starttls": True,
            "auth_required": True,
            "auth_require_tls": True,
            "authenticator": authenticator,
        }
    )
    try:
        overrides = {
            "smtp_host": "127.0.0.1",
            "smtp_port": server.port,
            "smtp_start_tls": True,
            "smtp_ca_file": str(ca_file),
            "smtp_username": "clm",
            "smtp_password": "s3cret-pass",
        }
        async with start_notifier(**overrides) as h:
            await setup(h)
            await h.profile("tls-1", {"email": "ada@example.com", "first_name": "Ada"})
            await h.wait_contact("tls-1")
            await h.publish(email_request("m-tls-1", "tls-1"))
            await h.wait_status("m-tls-1", "delivered")
        assert [m.envelope_to for m in server.messages] == [["ada@example.com"]]
        assert logins == [(b"clm", True)]  # authenticated, inside TLS
    finally:
        await server.stop()


def test_credentials_without_tls_to_a_remote_server_are_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="cross the network in clear"):
        NotifierSettings(
            smtp_host="smtp.example.com", smtp_username="clm", smtp_password="x"
        ).provider_configs()
    with pytest.raises(ValidationError, match="exclude each other"):
        ProviderConfig(kind="smtp", host="smtp.example.com", use_tls=True, start_tls=True)
    remote = NotifierSettings(
        smtp_host="smtp.example.com",
        smtp_port=587,
        smtp_start_tls=True,
        smtp_username="clm",
        smtp_password="x",
    ).provider_configs()["smtp"]
    assert (remote.start_tls, remote.username) == (True, "clm")
    # A relay on the same host (a local Postfix) may take credentials in clear.
    assert (
        NotifierSettings(smtp_username="clm", smtp_password="x").provider_configs()["smtp"].username == "clm"
    )
