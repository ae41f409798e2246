"""privacy_answer_chunks: answers to a request sent in parts (too many identifiers for one message)

Each answered part is kept here (by `part` of `parts`, with its chunks) until the service answered
every part; then the answer is merged into `privacy_answers`.

Revision ID: 0012_privacy_request_parts
Revises: 0011_one_head
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_privacy_request_parts"
down_revision = "0011_one_head"
branch_labels = None
depends_on = None

_KEY = ["request_id", "service", "action", "answered_at", "chunks", "chunk"]


def upgrade() -> None:
    op.add_column("privacy_answer_chunks", sa.Column("part", sa.Integer, nullable=False, server_default="0"))
    op.add_column("privacy_answer_chunks", sa.Column("parts", sa.Integer, nullable=False, server_default="1"))
    op.drop_constraint("privacy_answer_chunks_pkey", "privacy_answer_chunks", type_="primary")
    op.create_primary_key(
        "privacy_answer_chunks_pkey", "privacy_answer_chunks", [*_KEY[:3], "parts", "part", *_KEY[3:]]
    )


def downgrade() -> None:
    op.execute("DELETE FROM privacy_answer_chunks WHERE parts > 1")
    op.drop_constraint("privacy_answer_chunks_pkey", "privacy_answer_chunks", type_="primary")
    op.drop_column("privacy_answer_chunks", "parts")
    op.drop_column("privacy_answer_chunks", "part")
    op.create_primary_key("privacy_answer_chunks_pkey", "privacy_answer_chunks", _KEY)
