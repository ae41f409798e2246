"""catalogue, customer products, co-occurrence counts, stored per-customer recommendations (issue 9)

Revision ID: 0003_catalogue
Revises: 0002
"""

from alembic import op

revision = "0003_catalogue"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE catalogue_items (
            product_id text PRIMARY KEY,
            sku text, name text, category text, price numeric, brand text, url text, image_url text,
            tier integer,
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX catalogue_items_category ON catalogue_items (category, product_id)")
    # What each canonical customer bought (kind 'purchase') or viewed / added to a cart ('view').
    op.execute(
        """
        CREATE TABLE customer_products (
            customer_id text NOT NULL, kind text NOT NULL, product_id text NOT NULL,
            first_at timestamptz NOT NULL,
            PRIMARY KEY (customer_id, kind, product_id)
        )
        """
    )
    # Customer-level counts per signal: n_a per product, n_ab per ordered pair (both directions stored).
    op.execute(
        """
        CREATE TABLE product_counts (
            signal text NOT NULL, product_id text NOT NULL, customers integer NOT NULL,
            PRIMARY KEY (signal, product_id)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE product_pairs (
            signal text NOT NULL, a text NOT NULL, b text NOT NULL, customers integer NOT NULL,
            PRIMARY KEY (signal, a, b)
        )
        """
    )
    # The customer's current lists (template variables) and their categories, for the segment rule.
    op.execute(
        """
        CREATE TABLE customer_recommendations (
            customer_id text PRIMARY KEY,
            cross_sell jsonb NOT NULL, upsell jsonb NOT NULL,
            cross_sell_categories text[] NOT NULL, upsell_categories text[] NOT NULL,
            updated_at timestamptz NOT NULL
        )
        """
    )


def downgrade() -> None:
    for name in ("customer_recommendations", "product_pairs", "product_counts", "customer_products"):
        op.execute(f"DROP TABLE {name}")
    op.execute("DROP TABLE catalogue_items")
