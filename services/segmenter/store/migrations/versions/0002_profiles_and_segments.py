"""profiles, identities, merges, event aggregates and timeline, segments, memberships, timers

Revision ID: 0002
Revises: 0001
"""

from alembic import op

from services.segmenter.domain.rules import ISO_PATTERN_SQL
from services.segmenter.store import tables

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_NEW = (
    "customers",
    "identities",
    "merges",
    "event_counts",
    "events",
    "segments",
    "memberships",
    "segment_timers",
)


def upgrade() -> None:
    bind = op.get_bind()
    for name in _NEW:
        tables.metadata.tables[name].create(bind)
    op.execute("CREATE INDEX customers_email ON customers ((traits ->> 'email'))")
    # Dates inside traits: the same ISO-8601 subset the Python evaluator accepts; anything else is NULL.
    op.execute(
        f"""
        CREATE FUNCTION try_timestamptz(s text) RETURNS timestamptz
        LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
        BEGIN
            IF s IS NULL OR s !~ '{ISO_PATTERN_SQL}' THEN RETURN NULL; END IF;
            IF s ~ '(Z|[+-]\\d{{2}}:\\d{{2}})$' THEN RETURN s::timestamptz; END IF;
            RETURN s::timestamp AT TIME ZONE 'UTC';
        EXCEPTION WHEN others THEN RETURN NULL;
        END $$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION try_timestamptz(text)")
    for name in reversed(_NEW):
        op.drop_table(name)
