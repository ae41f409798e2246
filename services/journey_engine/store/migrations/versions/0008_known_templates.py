"""known_templates: the notifier's templates as announced on clm.templates.v1

Revision ID: 0008_known_templates
Revises: 0007_goal_windows
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_known_templates"
down_revision = "0007_goal_windows"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "known_templates",
        sa.Column("template_id", sa.Text, primary_key=True),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("known_templates")
