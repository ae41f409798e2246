"""customer aliases: the identifiers that resolve to another customer (a customer's own id wins)

Revision ID: 0007_customer_aliases
Revises: 0006_send_ledger_created_at
"""

from alembic import op

revision = "0007_customer_aliases"
down_revision = "0006_send_ledger_created_at"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One definition of the rule every lookup by identifier follows (`store/identities_repo.py`).
    op.execute(
        "CREATE VIEW customer_aliases AS SELECT i.identity, i.customer_id, i.linked_at "
        "FROM customer_identities i "
        "WHERE NOT EXISTS (SELECT 1 FROM contacts c WHERE c.customer_id = i.identity)"
    )


def downgrade() -> None:
    op.execute("DROP VIEW customer_aliases")
