"""contacts.email_address: a domain written with IDNA A-labels is kept as its U-labels

A complaint or bounce about `ann@xn--bcher-kva.example` (the form an SMTP server without SMTPUTF8
is given) and a profile's `ann@bücher.example` are one mailbox: the notifier now keys both as
`ann@bücher.example` (`domain.email_addresses.canonical_domain`). Contacts written before keep the
mailbox lower-cased as written; those with an `xn--` label get the U-label form here, so a complaint
finds their customer. Read as the notifier reads it (inlined: a migration stays as written).
Salted-hash keys (suppressions, complaints, tombstones) cannot be rewritten: the notifier looks them
up in both forms (`email_addresses.mailboxes`). After a downgrade, keys made by this revision's code
from an A-label address are of the U-label form, which the code before does not look up: import
complaints and bounces about such addresses again.

Revision ID: 0014_email_address_u_labels
Revises: 0013_email_complaints
"""

import unicodedata
from collections.abc import Callable
from email.utils import parseaddr

import idna
import sqlalchemy as sa
from alembic import op

revision = "0014_email_address_u_labels"
down_revision = "0013_email_complaints"
branch_labels = None
depends_on = None

_CHUNK = 5000


def _u_label(label: str) -> str:
    if not label.startswith("xn--"):
        return label
    try:
        decoded = idna.decode(label)
        valid = idna.encode(decoded) == label.encode("ascii")
    except UnicodeError:
        return label
    # Nothing the notifier refuses in an address (a zero-width joiner, a space, <, >, ").
    unsendable = any(unicodedata.category(c)[0] in "CZ" or c.isspace() or c in '<>"' for c in decoded)
    return decoded if valid and not unsendable else label


def _canonical(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local}@{'.'.join(_u_label(label) for label in domain.split('.'))}"


def _rewrite(where: str, form: Callable[[str], str | None], column: str) -> None:
    conn = op.get_bind()
    after = ""
    while True:
        rows = conn.execute(
            sa.text(
                f"SELECT customer_id, {column}, email_address FROM contacts "
                f"WHERE customer_id > :after AND {where} ORDER BY customer_id LIMIT :n"
            ),
            {"after": after, "n": _CHUNK},
        ).all()
        if not rows:
            break
        found = [
            (cid, new, old) for cid, value, old in rows if (new := form(value)) is not None and new != old
        ]
        if found:
            # Only rows still as read: a profile change committed meanwhile (a replica of the release
            # before, running through the migration) wrote the mailbox of its own, newer address.
            conn.execute(
                sa.text(
                    "UPDATE contacts AS c SET email_address = u.mailbox FROM unnest(CAST(:ids AS text[]), "
                    "CAST(:mailboxes AS text[]), CAST(:olds AS text[])) AS u(id, mailbox, old) "
                    "WHERE c.customer_id = u.id AND c.email_address IS NOT DISTINCT FROM u.old"
                ),
                {
                    "ids": [f[0] for f in found],
                    "mailboxes": [f[1] for f in found],
                    "olds": [f[2] for f in found],
                },
            )
        after = rows[-1][0]


def upgrade() -> None:
    _rewrite("email_address LIKE '%xn--%'", _canonical, "email_address")


def downgrade() -> None:
    # The mailbox as the code before read it (revision 0013's): lower case, A-labels as written.
    _rewrite(
        "email_address IS NOT NULL AND email ILIKE '%xn--%'",
        lambda email: parseaddr(email)[1].strip().lower(),
        "email",
    )
