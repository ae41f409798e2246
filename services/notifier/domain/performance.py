"""Message performance: what a marketer reads off a template, journey or channel (pure).

Counts per group, from the send ledger and the engagements:
- `requested`: messages asked for in the period; `sent`: handed to a provider (`sent`, `delivered`,
  `bounced`: a provider refusing the recipient at once was called too);
- `delivered`: confirmed by the provider (SMTP accepted, a provider's delivery report) and not later
  reported bounced; `bounced`: refused for the recipient, at once or by a later report;
- `failed` (includes `unknown`: the process stopped mid-call), `suppressed` (consent, erasure),
  `pending` (not decided yet);
- `opened`, `clicked`, `unsubscribed`: messages with at least one (opens are pixel loads, which
  mail clients that block images never report, and privacy proxies may load unasked);
- `complained`: messages a spam complaint was credited to (`POST /v1/complaints`: the customer's
  latest marketing email that went out).
Rates divide by `delivered` (opens, clicks, unsubscribes, complaints) or `sent` (delivery), `click_to_open` by
`opened`; a rate without a denominator is null.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

GroupBy = Literal["template", "journey", "node", "channel", "category"]
# The columns each grouping reports, in order.
GROUP_COLUMNS: dict[GroupBy, tuple[str, ...]] = {
    "template": ("template_id", "channel"),
    "journey": ("journey_id",),
    "node": ("journey_id", "node_id", "template_id"),
    "channel": ("channel",),
    "category": ("category",),
}
COUNTS = (
    "requested",
    "sent",
    "delivered",
    "bounced",
    "failed",
    "suppressed",
    "pending",
    "opened",
    "clicked",
    "unsubscribed",
    "complained",
)


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


@dataclass(frozen=True)
class Performance:
    group: dict[str, str | None]
    counts: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        c = self.counts
        return {
            **self.group,
            **c,
            "rates": {
                "delivery": _rate(c["delivered"], c["sent"]),
                "bounce": _rate(c["bounced"], c["sent"]),
                "open": _rate(c["opened"], c["delivered"]),
                "click": _rate(c["clicked"], c["delivered"]),
                "click_to_open": _rate(c["clicked"], c["opened"]),
                "unsubscribe": _rate(c["unsubscribed"], c["delivered"]),
                "complaint": _rate(c["complained"], c["delivered"]),
            },
        }
