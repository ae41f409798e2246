"""Identity resolution for a batch of events (pure): which canonical customer each event belongs to,
which identifiers to link, which profiles turn out to be one customer.

Rules:
- An event's identifiers are its `userId` and `anonymousId` (and an alias's `previousId`).
- Unknown identifiers are linked to the customer the known ones point at; if none is known, a new
  customer is created whose canonical id is the first identifier's value (or, when that is another
  customer's id, `<kind>:<value>`, then `<kind>:<value>:2`, ...).
- An event from CLM itself that names its customer (`customerId`, e.g. a journey's trait update) goes
  to that customer, or the one it was merged into, and links nothing.
- If the identifiers point at several customers, they are merged into one: the customer of the
  event's `userId` survives, else the oldest link. Two profiles that each hold a different `userId`
  are merged only by an explicit `alias` (a shared device identifying as a second user does not
  make the two users one customer).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from shared.contracts.events import CustomerEvent, EventType

USER = "user"
ANON = "anon"
MERGED = "merged"  # a merged-away customer id, linked to the survivor
Identifier = tuple[str, str]  # (kind, value)


@dataclass(frozen=True)
class Merge:
    from_id: str
    into_id: str
    message_id: str
    event_type: str
    identifiers: list[Identifier]


@dataclass
class IdentityPlan:
    new_customers: list[str] = field(default_factory=list)
    links: list[tuple[str, str, str]] = field(default_factory=list)  # kind, value, customer_id
    merges: list[Merge] = field(default_factory=list)
    # The canonical customer of each event, after every merge of the batch.
    customer_of_event: list[str] = field(default_factory=list)


def identifiers_of(event: CustomerEvent, known: Mapping[Identifier, str]) -> list[Identifier]:
    out: list[Identifier] = []
    if event.user_id:
        out.append((USER, event.user_id))
    if event.anonymous_id:
        out.append((ANON, event.anonymous_id))
    if event.type == EventType.ALIAS and event.previous_id:
        as_user = (USER, event.previous_id)
        out.append(as_user if as_user in known else (ANON, event.previous_id))
    return out


def batch_identifiers(events: Iterable[CustomerEvent]) -> set[Identifier]:
    """Every identifier the batch may look up (an alias's previousId under both kinds)."""
    out: set[Identifier] = set()
    for e in events:
        if e.user_id:
            out.add((USER, e.user_id))
        if e.anonymous_id:
            out.add((ANON, e.anonymous_id))
        if e.type == EventType.ALIAS and e.previous_id:
            out.update({(USER, e.previous_id), (ANON, e.previous_id)})
        if e.customer_id:
            out.add((MERGED, e.customer_id))  # its value is a candidate id too: existing customers show
    return out


def _addressed_customer(
    event: CustomerEvent, links: Mapping[Identifier, str], existing: set[str]
) -> str | None:
    """The customer an event from CLM itself names (`customerId`), if it is one we know: as it is,
    or the profile it was merged into. None: resolve the event by its identifiers."""
    cid = event.customer_id
    if not cid:
        return None
    if cid in existing:
        return cid
    return links.get((MERGED, cid))


def new_customer_id(first: Identifier, taken: set[str]) -> str:
    """A new customer's id: its first identifier's value, else `<kind>:<value>`, else
    `<kind>:<value>:2`, `:3`, ... (another customer may already be `7` and another `user:7`)."""
    kind, value = first
    if value not in taken:
        return value
    base = cid = f"{kind}:{value}"
    n = 2
    while cid in taken:
        cid, n = f"{base}:{n}", n + 1
    return cid


def plan_identities(
    events: list[CustomerEvent],
    known: Mapping[Identifier, str],
    customers_with_user: set[str],
    taken_ids: set[str],
    retired_ids: Iterable[str] = (),
) -> IdentityPlan:
    """`known`: identifier -> customer for the batch's identifiers already linked;
    `customers_with_user`: which of those customers hold a userId; `taken_ids`: existing customer ids
    among the batch's identifier values, their `<kind>:<value>` forms and, where both of those are
    taken, the ids starting `<kind>:<value>:` (`new_customer_id`: a new customer never reuses one);
    `retired_ids`: those that were customers merged into others (never reused either: an event naming
    one, `customerId`, means the survivor)."""
    links: dict[Identifier, str] = dict(known)
    with_user = set(customers_with_user)
    taken = set(taken_ids)
    unavailable = taken | set(retired_ids)
    redirect: dict[str, str] = {}
    plan = IdentityPlan()
    raw_customer: list[str] = []

    def find(cid: str) -> str:
        while cid in redirect:
            cid = redirect[cid]
        return cid

    for event in events:
        addressed = _addressed_customer(event, links, taken)
        if addressed is not None:
            raw_customer.append(addressed)
            continue
        ids = identifiers_of(event, links)
        owners: list[str] = []
        for ident in ids:
            if ident in links:
                owner = find(links[ident])
                if owner not in owners:
                    owners.append(owner)
        if not owners:
            cid = new_customer_id(ids[0], unavailable)
            taken.add(cid)
            unavailable.add(cid)
            plan.new_customers.append(cid)
            survivor = cid
        else:
            survivor = owners[0]
            user_key = (USER, event.user_id or "")
            user_owner = find(links[user_key]) if event.user_id and user_key in links else None
            if user_owner is not None:
                survivor = user_owner
            for other in owners:
                if other == survivor:
                    continue
                if event.type != EventType.ALIAS and survivor in with_user and other in with_user:
                    continue  # two known users: only an alias says they are one
                redirect[other] = survivor
                if other in with_user:
                    with_user.add(survivor)
                plan.merges.append(Merge(other, survivor, event.message_id, event.type.value, list(ids)))
        for ident in ids:
            if ident not in links:
                links[ident] = survivor
                plan.links.append((ident[0], ident[1], survivor))
        if event.user_id:
            with_user.add(survivor)
        raw_customer.append(survivor)
    plan.customer_of_event = [find(c) for c in raw_customer]
    plan.links = [(k, v, find(c)) for k, v, c in plan.links]
    return plan


def split_identities(identities: Mapping[str, list[str]], per_message: int) -> list[dict[str, list[str]]]:
    """A profile's identities (label -> values) in parts of at most `per_message` values, in order:
    one `ProfileChanged` each. Consumers add the identities a change names (never drop those it does
    not), so parts announce the whole set while every message stays far under Kafka's limit (a
    customer seen under thousands of anonymous ids would otherwise pass it, and be parked)."""
    parts: list[dict[str, list[str]]] = [{}]
    room = per_message
    for label, values in identities.items():
        rest = list(values)
        while rest:
            if room == 0:
                parts.append({})
                room = per_message
            taken, rest = rest[:room], rest[room:]
            parts[-1].setdefault(label, []).extend(taken)
            room -= len(taken)
    return parts
