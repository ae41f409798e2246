"""Dates in traits and properties: SQL reads as a date exactly what the Python evaluator does

Revision ID: 0007_python_dates
Revises: 0006_finite_revenue

`try_timestamptz` (back-fill, preview) handed the text to PostgreSQL's parser, which differs from
Python's `datetime.fromisoformat` (real time) at the edges: PostgreSQL reads `T24:00:00` and a leap
second `:60` (Python refuses both) and refuses offsets past +-15:59 (Python takes up to +-23:59, and
`+00:60` as one hour). A customer with such a trait was a member in one path and not in the other.
Now the SQL checks the fields as Python does and applies the offset itself.
"""

from alembic import op

from services.segmenter.domain.rules import ISO_PATTERN_SQL

revision = "0007_python_dates"
down_revision = "0006_finite_revenue"
branch_labels = None
depends_on = None

# The groups of a text that matches ISO_PATTERN_SQL: 3 hour, 4 minute, 6 second, 9 offset sign,
# 10 offset hours, 11 offset minutes. (No `(?:`: the migration's SQL text would read `:Z` as a bind.)
_PARTS = r"^(.{10})([T ](\d{2}):(\d{2})(:(\d{2})(\.\d+)?)?(Z|([+-])(\d{2}):(\d{2}))?)?$"


def upgrade() -> None:
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION try_timestamptz(s text) RETURNS timestamptz
        LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
        DECLARE
            m text[];
            offset_min int := 0;
        BEGIN
            IF s IS NULL OR s !~ '{ISO_PATTERN_SQL}' THEN RETURN NULL; END IF;
            m := regexp_match(s, '{_PARTS}');
            -- datetime.fromisoformat: hours 0-23 and seconds 0-59 (no 24:00:00, no leap second).
            IF m[3]::int > 23 OR m[4]::int > 59 OR m[6]::int > 59 THEN RETURN NULL; END IF;
            IF m[9] IS NOT NULL THEN
                -- Any offset under 24 hours, minutes as written (+00:60 is one hour).
                offset_min := m[10]::int * 60 + m[11]::int;
                IF offset_min >= 1440 THEN RETURN NULL; END IF;
                IF m[9] = '-' THEN offset_min := -offset_min; END IF;
            END IF;
            RETURN (regexp_replace(s, '(Z|[+-]\\d{{2}}:\\d{{2}})$', '')::timestamp
                    - make_interval(mins => offset_min)) AT TIME ZONE 'UTC';
        EXCEPTION WHEN others THEN RETURN NULL;
        END $$
        """
    )


def downgrade() -> None:
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION try_timestamptz(s text) RETURNS timestamptz
        LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
        BEGIN
            IF s IS NULL OR s !~ '{ISO_PATTERN_SQL}' THEN RETURN NULL; END IF;
            IF s ~ '(Z|[+-]\\d{{2}}:\\d{{2}})$' THEN RETURN s::timestamptz; END IF;
            RETURN s::timestamp AT TIME ZONE 'UTC';
        EXCEPTION WHEN others THEN RETURN NULL;
        END $$
        """
    )
