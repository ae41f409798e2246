"""identities: index (customer_id, kind), so "does this customer hold a userId" is one probe

Revision ID: 0004_identity_owner_index
Revises: 0003_privacy
"""

from alembic import op

revision = "0004_identity_owner_index"
down_revision = "0003_privacy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The identity lookup asks, for every identifier of a batch, whether its customer holds a userId.
    # With only (customer_id) and the (kind, value) key, PostgreSQL may AND two bitmaps, reading every
    # 'user' entry of the key per row.
    # 0002 creates tables from the current `tables` module, so a fresh schema has this index already.
    op.execute("CREATE INDEX IF NOT EXISTS identities_customer_kind ON identities (customer_id, kind)")
    op.execute("DROP INDEX IF EXISTS ix_identities_customer_id")


def downgrade() -> None:
    op.create_index("ix_identities_customer_id", "identities", ["customer_id"])
    op.drop_index("identities_customer_kind", table_name="identities")
