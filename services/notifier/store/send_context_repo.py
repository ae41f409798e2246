"""What a batch of sends needs, read in one round trip: the recipients' contacts (by any of their
identifiers), the templates, the subscription topics the requests name and the customers' consent
choices. Each is its module's own query (`contacts_repo.GET_MANY_SQL`, ...), sent as one
statement of `ARRAY(SELECT to_jsonb(q) FROM (<query>) AS q)` columns, so the modules' decoders read
the rows by column name as before: four statements were a round trip each in every unit of work that
queues requests, on the request -> mail path. (Every column read is JSON-safe: text, booleans,
integers and jsonb.)"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from services.notifier.domain.composition import ContactView
from services.notifier.domain.consent import SubscriptionTopic
from services.notifier.domain.templates import TemplateDefinition
from services.notifier.store import consent_repo, contacts_repo, templates_repo
from shared.db.engine import Statement


def _rows_of(sql: str) -> str:
    return f"ARRAY(SELECT to_jsonb(q) FROM ({sql}) AS q)"


_READ = Statement(
    "SELECT "
    + ", ".join(
        _rows_of(sql)
        for sql in (
            contacts_repo.GET_MANY_SQL,
            templates_repo.GET_MANY_SQL,
            consent_repo.TOPICS_BY_ID_SQL,
            consent_repo.CHOICES_FOR_SQL,
        )
    )
)


@dataclass(frozen=True)
class SendContext:
    contacts: dict[str, ContactView]  # by the customer id asked for
    templates: dict[str, TemplateDefinition]
    topics: dict[str, SubscriptionTopic]
    choices: dict[str, dict[tuple[str, str], bool]]  # customer as asked for -> (topic, channel) -> subscribed


async def read(
    session: AsyncSession,
    customers: Collection[str],
    template_ids: Collection[str],
    topic_ids: Collection[str],
) -> SendContext:
    [row] = await _READ.fetch(
        session,
        {"customers": list(customers), "templates": list(template_ids), "topics": list(topic_ids)},
    )
    contacts, templates, topics, choices = row
    return SendContext(
        contacts=contacts_repo.views(contacts),
        templates=templates_repo.definitions(templates),
        topics=consent_repo.topics(topics),
        choices=consent_repo.choices(customers, choices),
    )
