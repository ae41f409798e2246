"""contacts.phone_e164: an inbound STOP finds the customers by the E.164 form of their phone

Profiles write numbers as clients sent them (`+44 (0)20 7946 0000`); Twilio's `From` is E.164. A
number written with its country code (a leading `+`) gets its E.164 form here, read by the same
library the notifier reads it with (`phonenumbers`, inlined: a migration stays as written). One
written without its country code gets it with the profile's next change, read in
`CLM_SMS_DEFAULT_REGION` (the segmenter's `POST /v1/admin/republish-profiles` refreshes every
profile at once).

Revision ID: 0010_contacts_phone_e164
Revises: 0009_sms_address_optouts
"""

import phonenumbers
import sqlalchemy as sa
from alembic import op

revision = "0010_contacts_phone_e164"
down_revision = "0009_sms_address_optouts"
branch_labels = None
depends_on = None

_CHUNK = 5000


def _e164(phone: str) -> str | None:
    try:
        number = phonenumbers.parse(phone, None)
    except phonenumbers.NumberParseException:
        return None
    if phonenumbers.is_possible_number_with_reason(number) != phonenumbers.ValidationResult.IS_POSSIBLE:
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def upgrade() -> None:
    op.add_column("contacts", sa.Column("phone_e164", sa.Text))
    conn = op.get_bind()
    after = ""
    while True:
        rows = conn.execute(
            sa.text(
                "SELECT customer_id, phone FROM contacts WHERE customer_id > :after "
                "AND btrim(phone) LIKE '+%' ORDER BY customer_id LIMIT :n"
            ),
            {"after": after, "n": _CHUNK},
        ).all()
        if not rows:
            break
        found = [(cid, e164) for cid, phone in rows if (e164 := _e164(phone)) is not None]
        if found:
            conn.execute(
                sa.text(
                    "UPDATE contacts AS c SET phone_e164 = u.e164 FROM unnest(CAST(:ids AS text[]), "
                    "CAST(:e164 AS text[])) AS u(id, e164) WHERE c.customer_id = u.id"
                ),
                {"ids": [f[0] for f in found], "e164": [f[1] for f in found]},
            )
        after = rows[-1][0]
    op.create_index("contacts_phone_e164", "contacts", ["phone_e164"])
    op.drop_index("contacts_phone", "contacts")


def downgrade() -> None:
    op.create_index("contacts_phone", "contacts", ["phone"])
    op.drop_index("contacts_phone_e164", "contacts")
    op.drop_column("contacts", "phone_e164")
