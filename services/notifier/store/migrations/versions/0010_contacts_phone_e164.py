"""contacts.phone_e164: an inbound STOP finds the customers by the E.164 form of their phone

Profiles write numbers as clients sent them (`+1 (415) 555-0100`); Twilio's `From` is E.164. A
number written with its `+` gets its E.164 form here: the `+` and its digits, which is what the
notifier's rule reads from such a number written plainly (an extension would stay in: it is
corrected with the profile's next change). One written without its country code gets it with the
profile's next change, read in `CLM_SMS_DEFAULT_REGION` (the segmenter's
`POST /v1/admin/republish-profiles` refreshes every profile at once).

Revision ID: 0010_contacts_phone_e164
Revises: 0009_sms_address_optouts
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_contacts_phone_e164"
down_revision = "0009_sms_address_optouts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("contacts", sa.Column("phone_e164", sa.Text))
    op.execute(
        "UPDATE contacts SET phone_e164 = '+' || regexp_replace(phone, '[^0-9]', '', 'g') "
        "WHERE btrim(phone) LIKE '+%' AND regexp_replace(phone, '[^0-9]', '', 'g') <> ''"
    )
    op.create_index("contacts_phone_e164", "contacts", ["phone_e164"])
    op.drop_index("contacts_phone", "contacts")


def downgrade() -> None:
    op.create_index("contacts_phone", "contacts", ["phone"])
    op.drop_index("contacts_phone_e164", "contacts")
    op.drop_column("contacts", "phone_e164")
