"""The active segments indexed by what can change them (pure): which segments an event, a trait
change or another segment's membership change can affect, in dependency order."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.segmenter.domain.compiled import (
    NextChange,
    Predicate,
    compile_next_change,
    compile_predicate,
)
from services.segmenter.domain.rules import References, Rule, parse_duration, parse_rule, references


@dataclass(frozen=True)
class SegmentRule:
    segment_id: str
    name: str
    version: int
    rule: Rule
    refs: References
    # The rule compiled (`domain.compiled`): what the real-time path calls for each customer.
    holds: Predicate = field(compare=False)
    next_change_at: NextChange = field(compare=False)


def compile_segment(segment_id: str, name: str, version: int, definition: Any) -> SegmentRule:
    rule = parse_rule(definition)
    return SegmentRule(
        segment_id,
        name,
        version,
        rule,
        references(rule),
        compile_predicate(rule),
        compile_next_change(rule),
    )


class CycleError(ValueError):
    pass


def dependency_order(segments: Iterable[SegmentRule]) -> list[SegmentRule]:
    """Segments ordered so a segment comes after every segment it refers to (member_of)."""
    by_id = {s.segment_id: s for s in segments}
    order: list[SegmentRule] = []
    state: dict[str, int] = {}

    def visit(sid: str, trail: tuple[str, ...]) -> None:
        if state.get(sid) == 2:
            return
        if state.get(sid) == 1:
            raise CycleError(" -> ".join((*trail, sid)))
        state[sid] = 1
        for dep in sorted(by_id[sid].refs.segments):
            if dep in by_id:
                visit(dep, (*trail, sid))
        state[sid] = 2
        order.append(by_id[sid])

    for sid in sorted(by_id):
        visit(sid, ())
    return order


def cycle_through(segment_id: str, target: str, refers: Mapping[str, Iterable[str]]) -> list[str] | None:
    """If `segment_id` referring to `target` (member_of) closes a cycle, that cycle as segment ids
    from `segment_id` back to it (`[a, b, c, a]`; `refers`: what each other segment refers to), else
    None. Breadth first: the shortest such cycle."""
    came_from: dict[str, str] = {target: segment_id}
    todo = [target]
    while todo:
        later: list[str] = []
        for sid in todo:
            if sid == segment_id:
                trail, step = [segment_id], came_from[segment_id]
                while step != segment_id:
                    trail.append(step)
                    step = came_from[step]
                return [segment_id, *reversed(trail)]
            for dep in sorted(refers.get(sid, ())):
                if dep not in came_from:
                    came_from[dep] = sid
                    later.append(dep)
        todo = later
    return None


@dataclass
class Catalog:
    segments: list[SegmentRule] = field(default_factory=list)  # in dependency order
    by_trait: dict[str, set[str]] = field(default_factory=dict)
    by_event: dict[str, set[str]] = field(default_factory=dict)
    dependents: dict[str, set[str]] = field(default_factory=dict)
    timeline_events: set[str] = field(default_factory=set)
    count_events: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, segments: Iterable[SegmentRule]) -> Catalog:
        cat = cls(segments=dependency_order(segments))
        for s in cat.segments:
            for t in s.refs.traits:
                cat.by_trait.setdefault(t, set()).add(s.segment_id)
            for e in s.refs.events:
                cat.by_event.setdefault(e, set()).add(s.segment_id)
            for dep in s.refs.segments:
                cat.dependents.setdefault(dep, set()).add(s.segment_id)
            cat.timeline_events |= s.refs.timeline_events
            cat.count_events |= s.refs.events - {"*"}
        return cat

    def timeline_since(self, now: datetime) -> dict[str, datetime | None]:
        """For each event name rules need occurrence by occurrence, the oldest moment any rule looks
        at (None: all of them), so a snapshot loads only the occurrences that can matter."""
        out: dict[str, datetime | None] = {}
        for s in self.segments:
            for cond in s.refs.timeline_conditions:
                if cond.within is not None:
                    since: datetime | None = now - parse_duration(cond.within)
                elif cond.between is not None:
                    since = cond.between.start
                else:
                    since = None
                name = cond.performed
                if name not in out:
                    out[name] = since
                else:
                    current = out[name]
                    out[name] = None if current is None or since is None else min(current, since)
        return out

    @property
    def ids(self) -> set[str]:
        return {s.segment_id for s in self.segments}

    def affected(self, traits: Iterable[str], events: Iterable[str], *, everything: bool = False) -> set[str]:
        """Segments whose value may change after these trait changes and events (plus every segment
        that refers to one of them, transitively)."""
        if everything:
            return self.ids
        hit: set[str] = set()
        for t in traits:
            hit |= self.by_trait.get(t, set())
        events = list(events)
        for e in events:
            hit |= self.by_event.get(e, set())
        if events:
            hit |= self.by_event.get("*", set())
        return self.with_dependents(hit)

    def with_dependents(self, ids: set[str]) -> set[str]:
        out, todo = set(ids), list(ids)
        while todo:
            for d in self.dependents.get(todo.pop(), ()):
                if d not in out:
                    out.add(d)
                    todo.append(d)
        return out
