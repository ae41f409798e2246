"""Walking a journey graph: what happens to one instance given its state, the customer and an input.

Pure: no I/O, the caller supplies the time, the customer's projection (traits, segments, recent
sends for frequency caps) and persists the outcome (state, timer, effects) in one unit of work.
A walk runs through instant nodes (conditions, splits, sends, trait updates, webhooks) until the
instance has to wait (delay, wait for something, quiet hours) or leaves (exit node).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, time, timedelta
from typing import Any, Literal

from services.journey_engine.domain.conditions import Facts, all_hold, describe
from services.journey_engine.domain.definition import (
    MAX_NODES,
    ConditionNode,
    DelayNode,
    EntryNode,
    ExitNode,
    Graph,
    JourneyMessaging,
    SendNode,
    SplitNode,
    UpdateTraitNode,
    WaitEventNode,
    WaitMessageNode,
    WaitSegmentNode,
    WebhookNode,
)
from services.journey_engine.domain.timing import QuietHours, delay_until, local_day, zone
from shared.contracts.events import Channel, MessageCategory

# Instance context keys: each send node's last message id ({node id: message id}), and the version
# an instance was on before its first migration (`store.instances.migrate_version`).
SENT_MESSAGES = "message_ids"
MIGRATED_FROM = "migrated_from"

# Twice the largest journey: a walk through every node once always fits, with room for a few loops
# through waits that pass at once.
MAX_STEPS_PER_WALK = 2 * MAX_NODES


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class CapRule:
    limit: int
    period: Literal["day", "week"]


@dataclass(frozen=True)
class MessagingRules:
    """Global rules for marketing messages (transactional journeys bypass them)."""

    caps: Mapping[str, CapRule] = field(default_factory=dict)
    quiet_hours: QuietHours | None = None
    quiet_mode: Literal["hold", "skip"] = "hold"
    default_timezone: str = "UTC"

    def for_journey(self, own: JourneyMessaging | None) -> MessagingRules:
        """These rules with a journey's own overrides applied."""
        if own is None:
            return self
        rules = self
        if own.quiet_hours == "off":
            rules = replace(rules, quiet_hours=None)
        elif own.quiet_hours is not None:
            window = own.quiet_hours
            rules = replace(rules, quiet_hours=QuietHours(window.start, window.end), quiet_mode=window.mode)
        if own.frequency_caps == "ignore":
            rules = replace(rules, caps={})
        return rules


@dataclass
class CustomerView:
    customer_id: str
    traits: dict[str, Any] = field(default_factory=dict)
    timezone: str | None = None
    locale: str | None = None
    email: str | None = None
    phone: str | None = None
    stage: str | None = None
    segments: frozenset[str] = frozenset()
    # Marketing messages requested recently, per channel (for frequency caps across journeys).
    recent_sends: dict[str, list[datetime]] = field(default_factory=dict)
    # The segmenter's current recommendation lists ({"cross_sell": [...], "upsell": [...]}, issue 9).
    recommendations: dict[str, Any] | None = None


@dataclass(frozen=True)
class InstanceView:
    instance_id: str
    journey_id: str
    version: int
    node_id: str
    entered_at: datetime
    correlation: str = ""
    context: Mapping[str, Any] = field(default_factory=dict)
    wait: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Start:
    """Enter the journey: walk from the entry node."""


@dataclass(frozen=True)
class TimerFired:
    pass


@dataclass(frozen=True)
class EventArrived:
    name: str
    event: Mapping[str, Any]

    @property
    def properties(self) -> Mapping[str, Any]:
        props = self.event.get("properties")
        return props if isinstance(props, Mapping) else {}


@dataclass(frozen=True)
class SegmentChanged:
    segment_id: str
    change: str


@dataclass(frozen=True)
class StatusArrived:
    message_id: str
    status: str


Input = Start | TimerFired | EventArrived | SegmentChanged | StatusArrived


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class RequestMessage:
    node_id: str
    message_id: str
    channel: Channel
    template_id: str
    category: MessageCategory
    subscription_topic: str | None
    data: dict[str, Any]
    webhook_url: str | None = None


@dataclass(frozen=True)
class MessageWithheld:
    """A message the rules did not let through: recorded and published as `capped` or `skipped`."""

    node_id: str
    message_id: str
    channel: Channel
    template_id: str
    category: MessageCategory
    status: Literal["capped", "skipped"]
    reason: str


@dataclass(frozen=True)
class UpdateTraits:
    node_id: str
    event_id: str
    traits: dict[str, Any]


Effect = RequestMessage | MessageWithheld | UpdateTraits


@dataclass(frozen=True)
class PathStep:
    node_id: str
    note: str


@dataclass
class Outcome:
    node_id: str
    status: Literal["active", "exited"]
    context: dict[str, Any]
    wait: dict[str, Any] | None = None
    due_at: datetime | None = None
    exit_reason: str | None = None
    effects: list[Effect] = field(default_factory=list)
    # (node_id, metric) for per-node stats: entered, passed, exited.
    counts: list[tuple[str, str]] = field(default_factory=list)
    path: list[PathStep] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def facts_for(customer: CustomerView, event: Mapping[str, Any] | None = None) -> Facts:
    """What predicates see of a customer (and the event at hand): the one place entry filters,
    conditions, waits, goals and the dry run build it, so `customer.timezone` means the same in all."""
    return Facts(
        traits=customer.traits,
        event=event or {},
        customer={
            "id": customer.customer_id,
            "timezone": customer.timezone,
            "locale": customer.locale,
            "email": customer.email,
            "phone": customer.phone,
            "stage": customer.stage,
        },
        segments=customer.segments,
    )


def message_id(journey_id: str, version: int, instance_id: str, node_id: str, visit: int = 1) -> str:
    """Stable for one step: a redelivered or retried step asks for the same message again."""
    return f"jm:{journey_id}:v{version}:{visit_suffix(instance_id, node_id, visit)}"


def visit_suffix(instance_id: str, node_id: str, visit: int) -> str:
    """How a message id ends for this visit of the node, whatever the version (`message_id`)."""
    tail = f"{instance_id}:{node_id}"
    return tail if visit <= 1 else f"{tail}:{visit}"


def split_bucket(journey_id: str, node_id: str, customer_id: str) -> float:
    """A stable number in [0, 100) for a customer at a split: same customer, same arm."""
    digest = hashlib.sha256(f"{journey_id}|{node_id}|{customer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def pick_arm(node: SplitNode, bucket: float) -> str:
    upto = 0.0
    for arm in node.arms:
        upto += arm.percent
        if bucket < upto:
            return arm.name
    return node.arms[-1].name


def cap_reached(
    rule: CapRule, sends: list[datetime], now: datetime, tz_name: str | None, default_tz: str
) -> bool:
    if rule.period == "day":
        tz = zone(tz_name, default_tz)
        today = local_day(now, tz)
        count = sum(1 for t in sends if local_day(t, tz) == today)
    else:
        count = sum(1 for t in sends if t > now - timedelta(days=7))
    return count >= rule.limit


# --------------------------------------------------------------------------- the walker


class Walker:
    def __init__(
        self,
        graph: Graph,
        instance: InstanceView,
        customer: CustomerView,
        rules: MessagingRules,
        now: datetime,
        *,
        dry_run: bool = False,
    ) -> None:
        self.graph = graph
        self.instance = instance
        self.customer = customer
        self.rules = rules.for_journey(graph.definition.messaging)
        self.now = now
        self.dry_run = dry_run
        self.context: dict[str, Any] = {
            k: (dict(v) if isinstance(v, dict) else v) for k, v in instance.context.items()
        }
        self.outcome = Outcome(node_id=instance.node_id, status="active", context=self.context)
        self.tz = zone(customer.timezone, rules.default_timezone)

    # ---- entry points

    def react(self, event: Input) -> Outcome | None:
        """The outcome of `event` for this instance, or None when it does not concern it."""
        node = self.graph.nodes.get(self.instance.node_id)
        wait = self.instance.wait or {}
        if isinstance(event, Start) or (wait.get("kind") == "start" and isinstance(event, TimerFired)):
            return self._walk(self.graph.entry_id)
        if node is None:
            return None
        if isinstance(event, TimerFired):
            if isinstance(node, DelayNode):
                return self._leave_and_walk(node.id, None, "delay over")
            if isinstance(node, (WaitEventNode, WaitSegmentNode, WaitMessageNode)):
                return self._leave_and_walk(node.id, "timeout", "timed out")
            if isinstance(node, SendNode) and wait.get("kind") == "quiet_hours":
                return self._walk(node.id, arriving=False)
            return None
        if isinstance(event, EventArrived) and isinstance(node, WaitEventNode):
            if event.name != node.event or not all_hold(node.where, self._facts(event.event)):
                return None
            if node.match_correlation and self._correlation_of(event) != self.instance.correlation:
                return None
            self.context["last_event"] = dict(event.event)
            return self._leave_and_walk(node.id, "matched", f"'{event.name}' arrived")
        if isinstance(event, SegmentChanged) and isinstance(node, WaitSegmentNode):
            if event.segment_id == node.segment_id and event.change == node.change:
                return self._leave_and_walk(node.id, "matched", f"{event.change} segment {event.segment_id}")
            return None
        if isinstance(event, StatusArrived) and isinstance(node, WaitMessageNode):
            if event.message_id == wait.get("message_id") and event.status in node.statuses:
                return self._leave_and_walk(node.id, "matched", f"message {event.status}")
            return None
        return None

    # ---- walking

    def _correlation_of(self, event: EventArrived) -> str:
        key = self.graph.definition.correlation_key
        value = event.properties.get(key) if key else None
        return "" if value is None else str(value)

    def _facts(self, event: Mapping[str, Any] | None = None) -> Facts:
        if event is None:
            last = self.context.get("last_event") or self.context.get("trigger") or {}
            event = last if isinstance(last, Mapping) else {}
        return facts_for(self.customer, event)

    def _note(self, node_id: str, note: str) -> None:
        self.outcome.path.append(PathStep(node_id, note))

    def _leave_and_walk(self, node_id: str, branch: str | None, why: str) -> Outcome:
        self.outcome.counts.append((node_id, "passed"))
        self._note(node_id, why + (f" -> branch '{branch}'" if branch else ""))
        return self._walk(self.graph.follow(node_id, branch))

    def _wait(self, node_id: str, wait: dict[str, Any], due_at: datetime | None) -> Outcome:
        self.outcome.node_id = node_id
        self.outcome.wait = wait
        self.outcome.due_at = due_at
        return self.outcome

    def _visit(self, node_id: str) -> int:
        visits: dict[str, int] = self.context.setdefault("visits", {})
        visits[node_id] = visits.get(node_id, 0) + 1
        return visits[node_id]

    def _walk(self, node_id: str, *, arriving: bool = True) -> Outcome:
        for _ in range(MAX_STEPS_PER_WALK):
            node = self.graph.nodes[node_id]
            if arriving:
                self.outcome.counts.append((node_id, "entered"))
            arriving = True
            match node:
                case EntryNode():
                    self._note(node_id, "entered the journey")
                    self.outcome.counts.append((node_id, "passed"))
                    node_id = self.graph.follow(node_id)
                case ExitNode():
                    self._note(node_id, "exit")
                    self.outcome.counts.append((node_id, "exited"))
                    self.outcome.node_id = node_id
                    self.outcome.status = "exited"
                    self.outcome.exit_reason = "completed"
                    return self.outcome
                case DelayNode():
                    due, why = delay_until(node, self.now, self.tz, self.customer.traits)
                    if due <= self.now:
                        self._note(node_id, why)
                        self.outcome.counts.append((node_id, "passed"))
                        node_id = self.graph.follow(node_id)
                        continue
                    if self.dry_run:
                        self._note(node_id, f"{why} ({due.isoformat()})")
                        self.now = due
                        self.outcome.counts.append((node_id, "passed"))
                        node_id = self.graph.follow(node_id)
                        continue
                    self._note(node_id, f"{why} ({due.isoformat()})")
                    return self._wait(node_id, {"kind": "delay"}, due)
                case WaitEventNode() | WaitSegmentNode() | WaitMessageNode():
                    wait = self._wait_spec(node)
                    due = self.now + node.timeout
                    if self.dry_run:
                        self._note(
                            node_id,
                            f"would wait up to {node.timeout} for {wait['what']}; assuming it times out",
                        )
                        self.now = due
                        self.outcome.counts.append((node_id, "passed"))
                        node_id = self.graph.follow(node_id, "timeout")
                        continue
                    self._note(node_id, f"waits up to {node.timeout} for {wait['what']}")
                    return self._wait(node_id, wait, due)
                case ConditionNode():
                    facts = self._facts()
                    chosen = "else"
                    for branch in node.branches:
                        if all_hold(branch.where, facts):
                            chosen = branch.name
                            break
                    why = (
                        "no branch matched"
                        if chosen == "else"
                        else "matched "
                        + " and ".join(
                            describe(p)
                            for p in node.branches[[b.name for b in node.branches].index(chosen)].where
                        )
                    )
                    self._note(node_id, f"{why} -> branch '{chosen}'")
                    self.outcome.counts.append((node_id, "passed"))
                    node_id = self.graph.follow(node_id, chosen)
                case SplitNode():
                    arms: dict[str, str] = self.context.setdefault("arms", {})
                    bucket = split_bucket(self.instance.journey_id, node_id, self.customer.customer_id)
                    arm = arms.get(node_id) or pick_arm(node, bucket)
                    arms[node_id] = arm
                    holdout = next((a.name for a in node.arms if a.holdout), None)
                    self._note(
                        node_id,
                        f"bucket {bucket:.2f} -> arm '{arm}'" + (" (holdout)" if arm == holdout else ""),
                    )
                    self.outcome.counts.append((node_id, "passed"))
                    node_id = self.graph.follow(node_id, arm)
                case SendNode() | WebhookNode():
                    held = self._send(node)
                    if held is not None:
                        return held
                    self.outcome.counts.append((node_id, "passed"))
                    node_id = self.graph.follow(node_id)
                case UpdateTraitNode():
                    visit = self._visit(node_id)
                    event_id = message_id(
                        self.instance.journey_id,
                        self.instance.version,
                        self.instance.instance_id,
                        node_id,
                        visit,
                    )
                    self.outcome.effects.append(UpdateTraits(node_id, event_id, dict(node.traits)))
                    # Later conditions in this walk see the new values at once.
                    self.customer.traits = {**self.customer.traits, **node.traits}
                    self._note(node_id, f"sets traits {sorted(node.traits)}")
                    self.outcome.counts.append((node_id, "passed"))
                    node_id = self.graph.follow(node_id)
        raise RuntimeError(f"walk did not stop within {MAX_STEPS_PER_WALK} steps")

    def _wait_spec(self, node: WaitEventNode | WaitSegmentNode | WaitMessageNode) -> dict[str, Any]:
        if isinstance(node, WaitEventNode):
            what = f"event '{node.event}'" + (
                f" with the same {self.graph.definition.correlation_key}" if node.match_correlation else ""
            )
            return {"kind": "event", "event": node.event, "what": what}
        if isinstance(node, WaitSegmentNode):
            return {
                "kind": "segment",
                "segment_id": node.segment_id,
                "change": node.change,
                "what": f"{node.change} segment {node.segment_id}",
            }
        # The id the send node's message got: it names the version it was sent on, which is not the
        # instance's own once a migration moved it (v1's mail, a v2 instance: nothing matched).
        visits = self.context.get("visits", {})
        visit = max(1, int(visits.get(node.send_node, 1)))
        sent = self.context.get(SENT_MESSAGES, {})
        kept = sent.get(node.send_node) if isinstance(sent, Mapping) else None
        if isinstance(kept, str) and kept.endswith(
            visit_suffix(self.instance.instance_id, node.send_node, visit)
        ):
            mid = kept
        else:
            # None kept: sent before ids were kept, on the version the instance had then (the one it
            # left at its first migration since, if any). An earlier visit's: a replica of the
            # release before sent this visit (it keeps the ids, never updates them), on the
            # instance's version, as that release's wait expects.
            before = self.context.get(MIGRATED_FROM)
            mid = message_id(
                self.instance.journey_id,
                before if kept is None and isinstance(before, int) else self.instance.version,
                self.instance.instance_id,
                node.send_node,
                visit,
            )
        return {
            "kind": "message",
            "message_id": mid,
            "statuses": [str(s) for s in node.statuses],
            "what": f"message {'/'.join(node.statuses)}",
        }

    def _send(self, node: SendNode | WebhookNode) -> Outcome | None:
        """Request the message, or withhold it (cap, quiet hours); an Outcome when held until later."""
        definition = self.graph.definition
        channel = Channel.WEBHOOK if isinstance(node, WebhookNode) else node.channel
        category = definition.category
        visits: dict[str, int] = self.context.setdefault("visits", {})
        visit = visits.get(node.id, 0) + 1
        mid = message_id(
            self.instance.journey_id, self.instance.version, self.instance.instance_id, node.id, visit
        )
        marketing = category == MessageCategory.MARKETING and channel != Channel.WEBHOOK
        if marketing and self.rules.quiet_hours is not None:
            end = self.rules.quiet_hours.window_end(self.now, self.tz)
            if end is not None:
                quiet = self.rules.quiet_hours
                window = f"quiet hours {_hm(quiet.start)}-{_hm(quiet.end)} {self.tz.key}"
                if self.rules.quiet_mode == "hold" and not self.dry_run:
                    self._note(node.id, f"held by {window} until {end.isoformat()}")
                    return self._wait(node.id, {"kind": "quiet_hours"}, end)
                if self.rules.quiet_mode == "skip":
                    self._sent(node.id, visit, mid)
                    self._withhold(node, mid, channel, "skipped", window)
                    return None
        cap = self.rules.caps.get(str(channel)) if marketing else None
        sends = self.customer.recent_sends.setdefault(str(channel), [])
        if cap is not None and cap_reached(
            cap, sends, self.now, self.customer.timezone, self.rules.default_timezone
        ):
            self._sent(node.id, visit, mid)
            self._withhold(
                node, mid, channel, "capped", f"frequency cap: {cap.limit} {channel} per {cap.period}"
            )
            return None
        self._sent(node.id, visit, mid)
        if marketing:
            sends.append(self.now)
        data: dict[str, Any] = {
            "traits": dict(self.customer.traits),
            "event": self.context.get("last_event") or self.context.get("trigger") or {},
            "journey": {
                "id": self.instance.journey_id,
                "version": self.instance.version,
                "instance_id": self.instance.instance_id,
                "node_id": node.id,
                "correlation": self.instance.correlation,
            },
            # As of the send, so "wait 7 days, then send the top 3 cross-sell items" uses fresh lists.
            "recommendations": self.customer.recommendations or {"cross_sell": [], "upsell": []},
            **node.data,
        }
        self.outcome.effects.append(
            RequestMessage(
                node_id=node.id,
                message_id=mid,
                channel=channel,
                template_id=node.template_id,
                category=category,
                subscription_topic=node.subscription_topic if isinstance(node, SendNode) else None,
                data=data,
                webhook_url=node.url if isinstance(node, WebhookNode) else None,
            )
        )
        self._note(node.id, f"requests {channel} '{node.template_id}'")
        return None

    def _sent(self, node_id: str, visit: int, mid: str) -> None:
        """Count the visit and keep the id its message got (requested or withheld): `wait_message`
        waits for that id, whatever version the instance is on by then."""
        self.context.setdefault("visits", {})[node_id] = visit
        self.context.setdefault(SENT_MESSAGES, {})[node_id] = mid

    def _withhold(
        self,
        node: SendNode | WebhookNode,
        mid: str,
        channel: Channel,
        status: Literal["capped", "skipped"],
        why: str,
    ) -> None:
        self.outcome.effects.append(
            MessageWithheld(
                node.id, mid, channel, node.template_id, self.graph.definition.category, status, why
            )
        )
        self._note(node.id, f"{status}: {why}")


def _hm(t: time) -> str:
    return t.isoformat("minutes")


def dry_run(
    graph: Graph,
    customer: CustomerView,
    rules: MessagingRules,
    now: datetime,
    trigger: Mapping[str, Any] | None = None,
    journey_id: str = "dry-run",
) -> Outcome:
    """The path a customer would take from the entry now, assuming every wait times out.

    `journey_id` matters for splits: arms are a stable hash of (journey, node, customer).
    """
    instance = InstanceView(
        instance_id="dry-run",
        journey_id=journey_id,
        version=0,
        node_id=graph.entry_id,
        entered_at=now,
        context={"trigger": dict(trigger)} if trigger else {},
    )
    walker = Walker(
        graph,
        instance,
        replace(customer, recent_sends={k: list(v) for k, v in customer.recent_sends.items()}),
        rules,
        now,
        dry_run=True,
    )
    try:
        return walker.react(Start()) or walker.outcome
    except RuntimeError:
        # A loop through waits that never ends when every wait is assumed to time out.
        walker.outcome.path.append(PathStep(walker.outcome.node_id, "stopped: the path loops"))
        return walker.outcome
