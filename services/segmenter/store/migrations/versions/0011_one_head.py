"""Join the three branches of the segmenter's history (catalogue, lifecycle, and the privacy line
that went on to 0010) into one head, as the other services did: `alembic upgrade head` (singular) and
`alembic heads` then work for an operator. Changes nothing in the schema.

Revision ID: 0011_one_head
Revises: 0003_catalogue, 0003_lifecycle, 0010_segment_deletions
"""

revision = "0011_one_head"
down_revision = ("0003_catalogue", "0003_lifecycle", "0010_segment_deletions")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
