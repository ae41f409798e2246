"""Lifecycle science, pure and I/O-free (definitions and references: docs/lifecycle.md).

- `summary`: frequency / recency / T / monetary value from a transaction log (lifetimes semantics);
- `bgnbd`: BG/NBD fit, expected purchases, P(alive), churn risk;
- `gamma_gamma`: Gamma-Gamma spend model and discounted CLV;
- `rfm`: recency / frequency / monetary and 1-5 quintile scores;
- `voice`: NPS / CSAT and the `Survey Responded` event convention;
- `kpis`: retention, churn, cohort table, NPS over time, group averages, stage transitions;
- `stages`: the ordered stage rules (a pydantic condition model) and their evaluation;
- `snapshot`: one customer's metrics snapshot, the input of the stage rules.
"""
