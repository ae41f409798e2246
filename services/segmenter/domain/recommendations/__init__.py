"""Product recommendations (cross-sell, upsell) learnt from the purchases and views CLM receives.

Pure functions and models, no I/O: `catalogue` (item model, extraction from e-commerce events,
bulk-upsert request), `cooccurrence` (customer-level co-purchase/co-view counts and item-to-item
scores) and `recommend` (per-customer lists with reasons and cold start). See docs/recommendations.md.
"""
