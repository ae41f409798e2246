"""email_address_optouts: a spam complaint opts the email address itself out of marketing email;
contacts.email_address: the customers a complaint opts out are found by their email's mailbox

`email_address_optouts` is keyed by a salted hash (HMAC-SHA256 with CLM_PRIVACY_SALT) of the
address's mailbox in lower case, never the address, as `sms_address_optouts` keeps SMS STOPs.
`contacts.email_address` is the profile email's mailbox in lower case (`Ann <Ann@Example.com>` ->
`ann@example.com`), filled here for the contacts written before, read as the notifier reads it
(`email.utils.parseaddr`, inlined: a migration stays as written).

Revision ID: 0013_email_complaints
Revises: 0012_outbox_packed
"""

from email.utils import parseaddr

import sqlalchemy as sa
from alembic import op

revision = "0013_email_complaints"
down_revision = "0012_outbox_packed"
branch_labels = None
depends_on = None

_CHUNK = 5000


def _mailbox(value: str) -> str | None:
    address = parseaddr(value)[1].strip().lower()
    return address if "@" in address and len(address) <= 320 else None


def upgrade() -> None:
    op.create_table(
        "email_address_optouts",
        sa.Column("address_hash", sa.Text, primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("opted_out_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.add_column("contacts", sa.Column("email_address", sa.Text))
    conn = op.get_bind()
    after = ""
    while True:
        rows = conn.execute(
            sa.text(
                "SELECT customer_id, email FROM contacts WHERE customer_id > :after AND email IS NOT NULL "
                "ORDER BY customer_id LIMIT :n"
            ),
            {"after": after, "n": _CHUNK},
        ).all()
        if not rows:
            break
        found = [(cid, mailbox) for cid, email in rows if (mailbox := _mailbox(email)) is not None]
        if found:
            conn.execute(
                sa.text(
                    "UPDATE contacts AS c SET email_address = u.mailbox FROM unnest(CAST(:ids AS text[]), "
                    "CAST(:mailboxes AS text[])) AS u(id, mailbox) WHERE c.customer_id = u.id"
                ),
                {"ids": [f[0] for f in found], "mailboxes": [f[1] for f in found]},
            )
        after = rows[-1][0]
    op.create_index("contacts_email_address", "contacts", ["email_address"])


def downgrade() -> None:
    op.drop_index("contacts_email_address", "contacts")
    op.drop_column("contacts", "email_address")
    op.drop_table("email_address_optouts")
