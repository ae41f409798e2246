"""Checks a journey's references to the notifier's templates against what the notifier announced
(pure). Warnings, not errors: the announcement of a template saved a moment ago may still be on its
way, and a journey may be written before its templates."""

from __future__ import annotations

from collections.abc import Mapping

from services.journey_engine.domain.definition import GraphError, JourneyDefinition, SendNode, WebhookNode
from shared.contracts.events import Channel


def referenced_templates(definition: JourneyDefinition) -> dict[str, list[tuple[str, Channel]]]:
    """template id -> the (node id, channel) of each node that sends with it."""
    out: dict[str, list[tuple[str, Channel]]] = {}
    for node in definition.nodes:
        if isinstance(node, SendNode):
            out.setdefault(node.template_id, []).append((node.id, node.channel))
        elif isinstance(node, WebhookNode):
            out.setdefault(node.template_id, []).append((node.id, Channel.WEBHOOK))
    return out


def template_warnings(definition: JourneyDefinition, channels: Mapping[str, str] | None) -> list[GraphError]:
    """`channels`: template id -> channel of the live templates the notifier announced (None: it has
    announced none yet, so nothing can be said)."""
    if channels is None:
        return []
    warnings: list[GraphError] = []
    for template_id, uses in sorted(referenced_templates(definition).items()):
        channel = channels.get(template_id)
        for node_id, wanted in uses:
            field = f"nodes.{node_id}.template_id"
            if channel is None:
                warnings.append(
                    GraphError(
                        field,
                        "unknown_template",
                        f"the notifier has no template '{template_id}': this step's messages will fail "
                        "until it is created",
                    )
                )
            elif channel != wanted.value:
                warnings.append(
                    GraphError(
                        field,
                        "template_channel",
                        f"template '{template_id}' is for {channel}, this step sends {wanted.value}: its "
                        "messages will fail",
                    )
                )
    return warnings
