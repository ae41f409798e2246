"""lifecycle: per-customer lifecycle columns, stage history, fitted models, stage policy, surveys, messages

Revision ID: 0003_lifecycle
Revises: 0002
"""

from alembic import op

revision = "0003_lifecycle"
down_revision = "0002"
branch_labels = None
depends_on = None

# Plain columns on `customers` so segment rules read them like the other profile fields (Python evaluator
# and SQL compiler alike).
_CUSTOMER_COLUMNS = (
    ("lifecycle_stage", "text"),
    ("lifecycle_stage_since", "timestamptz"),
    ("p_alive", "float8"),
    ("churn_risk", "float8"),
    ("expected_orders", "float8"),
    ("predicted_clv", "float8"),
    ("rfm_r", "int"),
    ("rfm_f", "int"),
    ("rfm_m", "int"),
    ("rfm_score", "int"),
    ("nps_score", "int"),
    ("nps_category", "text"),
    ("nps_at", "timestamptz"),
    ("csat_score", "int"),
    ("csat_at", "timestamptz"),
)


def upgrade() -> None:
    for name, kind in _CUSTOMER_COLUMNS:
        op.execute(f"ALTER TABLE customers ADD COLUMN IF NOT EXISTS {name} {kind}")
    op.execute("CREATE INDEX IF NOT EXISTS customers_lifecycle_stage ON customers (lifecycle_stage)")
    op.execute(
        "CREATE TABLE lifecycle_stage_history ("
        " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " customer_id text NOT NULL, from_stage text, to_stage text NOT NULL,"
        " changed_at timestamptz NOT NULL, cause text NOT NULL)"
    )
    op.execute("CREATE INDEX lifecycle_stage_history_customer ON lifecycle_stage_history (customer_id, id)")
    op.execute("CREATE INDEX lifecycle_stage_history_time ON lifecycle_stage_history (changed_at)")
    op.execute(
        "CREATE TABLE lifecycle_models ("
        " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " fitted_at timestamptz NOT NULL, transactions jsonb, spend jsonb, rfm_cuts jsonb NOT NULL,"
        " customers bigint NOT NULL, buyers bigint NOT NULL, duration_s float8 NOT NULL)"
    )
    op.execute(
        "CREATE TABLE lifecycle_policy ("
        " id int PRIMARY KEY CHECK (id = 1), policy jsonb NOT NULL, updated_at timestamptz NOT NULL)"
    )
    op.execute(
        "CREATE TABLE survey_responses ("
        " message_id text PRIMARY KEY, customer_id text NOT NULL, survey_type text NOT NULL,"
        " score int NOT NULL, comment text, survey_id text, answered_at timestamptz NOT NULL)"
    )
    op.execute("CREATE INDEX survey_responses_time ON survey_responses (survey_type, answered_at)")
    op.execute(
        "CREATE TABLE customer_messages ("
        " customer_id text NOT NULL, message_id text NOT NULL, channel text NOT NULL, template_id text,"
        " status text NOT NULL, status_at timestamptz NOT NULL,"
        " received boolean NOT NULL, opened boolean NOT NULL, clicked boolean NOT NULL,"
        " PRIMARY KEY (customer_id, message_id))"
    )
    op.execute("CREATE INDEX customer_messages_recent ON customer_messages (customer_id, status_at DESC)")


def downgrade() -> None:
    for table in (
        "customer_messages",
        "survey_responses",
        "lifecycle_policy",
        "lifecycle_models",
        "lifecycle_stage_history",
    ):
        op.execute(f"DROP TABLE IF EXISTS {table}")
    op.execute("DROP INDEX IF EXISTS customers_lifecycle_stage")
    for name, _ in _CUSTOMER_COLUMNS:
        op.execute(f"ALTER TABLE customers DROP COLUMN IF EXISTS {name}")
