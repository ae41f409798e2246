"""/v1/templates: CRUD (admin token), preview with sample data or a real customer, test send."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from services.notifier.api.dependencies import NotifierDep
from services.notifier.domain.composition import recipient_address, template_data
from services.notifier.domain.signing import PREVIEW_UNSUBSCRIBE_PATH, MessageLinks
from services.notifier.domain.templates import RenderError
from services.notifier.service import Notifier
from services.notifier.store import contacts_repo, recommendations_repo, templates_repo
from services.notifier.template_announcements import announce_template
from shared.contracts import Channel, MessageCategory, MessageRequested, Recipient, storable
from shared.contracts.events import message_data_problems
from shared.http import ApiError, field_error

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class TemplateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    channel: Channel
    default_locale: str = Field(default="en", min_length=2, max_length=20)
    variants: dict[str, dict[str, str]] = Field(min_length=1)


class NewTemplate(TemplateBody):
    id: str = Field(pattern=NAME)


class PreviewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_id: str | None = None
    locale: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    # As marketing (the default) the footer's `{% unsubscribe_link %}` shows, pointing at a page that
    # only says it is a preview: a marketer clicking it unsubscribes no one.
    category: MessageCategory = MessageCategory.MARKETING
    subscription_topic: str | None = Field(default=None, max_length=128)


class _PreviewLinks(MessageLinks):
    """A preview's links lead nowhere that changes anything."""

    def unsubscribe_url(
        self, customer_id: str, channel: str, topic: str | None, message_id: str | None
    ) -> str:
        return f"{self.base_url}{PREVIEW_UNSUBSCRIBE_PATH}"


def storable_data(data: dict[str, Any]) -> dict[str, Any]:
    """Writable as the send ledger writes it (orjson): not too deep, integers within 64 bits."""
    if storable.too_deep_path(data) is not None:
        raise ValueError(f"data {storable.DEPTH_MESSAGE}")
    try:
        orjson.dumps(data)
    except TypeError as exc:
        raise ValueError("integers in data must fit in 64 bits; send larger numbers as strings") from exc
    return data


# A request's template data, which the send ledger stores: a 400 naming `data`, not a 500 on write.
TemplateData = Annotated[dict[str, Any], AfterValidator(storable_data)]


class TestSendBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipient: Recipient = Field(default_factory=Recipient)
    customer_id: str = "test-customer"
    data: TemplateData = Field(default_factory=dict)


# The recipient field a test send of each channel needs (in-app goes to the inbox of `customer_id`).
_ADDRESS_FIELD = {
    Channel.EMAIL: "email",
    Channel.SMS: "phone",
    Channel.PUSH: "push_token",
    Channel.WEBHOOK: "webhook_url",
}


def check_template_data(data: dict[str, Any]) -> None:
    """A 400 naming the field for `data` the template variables cannot be made from (`traits` as a
    list, say), before anything is queued or rendered."""
    problems = message_data_problems(data)
    if problems:
        raise ApiError(
            400,
            "invalid_request",
            "data cannot be used as template data",
            errors=[field_error(field, "object", problem) for field, problem in problems],
        )


def router(admin: Any) -> APIRouter:
    api = APIRouter(prefix="/v1/templates", tags=["templates"], dependencies=[Depends(admin)])

    def check(notifier: Notifier, body: TemplateBody) -> None:
        if body.default_locale not in body.variants:
            raise ApiError(
                400,
                "invalid_template",
                "the default locale needs a variant",
                errors=[
                    field_error(
                        "default_locale", "variant_required", f"no variant for {body.default_locale!r}"
                    )
                ],
            )
        problems = notifier.renderer.validate(body.channel, body.variants)
        if problems:
            raise ApiError(
                400,
                "invalid_template",
                "the template cannot be used",
                errors=[field_error(f, "liquid", msg) for f, msg in problems],
            )

    @api.post("", status_code=201)
    async def create(body: NewTemplate, notifier: NotifierDep) -> dict[str, Any]:
        check(notifier, body)
        async with notifier.platform.unit_of_work() as uow:
            created = await templates_repo.create(
                uow.session,
                template_id=body.id,
                name=body.name,
                channel=body.channel.value,
                default_locale=body.default_locale,
                variants=body.variants,
                now=notifier.clock.now(),
            )
            if created is not None:
                announce_template(uow, created)
        if created is None:
            raise ApiError(
                409,
                "conflict",
                f"template {body.id!r} exists",
                errors=[field_error("id", "unique", "a template with this id exists")],
            )
        return created

    @api.get("")
    async def list_templates(notifier: NotifierDep) -> dict[str, Any]:
        async with notifier.platform.unit_of_work() as uow:
            return {"templates": await templates_repo.list_all(uow.session)}

    @api.get("/{template_id}")
    async def get(template_id: str, notifier: NotifierDep) -> dict[str, Any]:
        async with notifier.platform.unit_of_work() as uow:
            found = await templates_repo.get(uow.session, template_id)
        if found is None:
            raise ApiError(404, "not_found", f"no template {template_id!r}")
        return found

    @api.put("/{template_id}")
    async def replace(template_id: str, body: TemplateBody, notifier: NotifierDep) -> dict[str, Any]:
        check(notifier, body)
        async with notifier.platform.unit_of_work() as uow:
            updated = await templates_repo.update(
                uow.session,
                template_id,
                name=body.name,
                channel=body.channel.value,
                default_locale=body.default_locale,
                variants=body.variants,
                now=notifier.clock.now(),
            )
            if updated is not None:
                announce_template(uow, updated)
        if updated is None:
            raise ApiError(404, "not_found", f"no template {template_id!r}")
        return updated

    @api.delete("/{template_id}", status_code=204)
    async def delete(template_id: str, notifier: NotifierDep) -> None:
        async with notifier.platform.unit_of_work() as uow:
            deleted = await templates_repo.delete(uow.session, template_id)
            if deleted is not None:
                announce_template(uow, {**deleted, "updated_at": notifier.clock.now()}, deleted=True)
        if deleted is None:
            raise ApiError(404, "not_found", f"no template {template_id!r}")

    @api.post("/{template_id}/preview")
    async def preview(template_id: str, body: PreviewBody, notifier: NotifierDep) -> dict[str, Any]:
        check_template_data(body.data)
        async with notifier.platform.unit_of_work() as uow:
            template = await templates_repo.get_definition(uow.session, template_id)
            contact = await contacts_repo.get(uow.session, body.customer_id) if body.customer_id else None
            # Issue 9: a real customer's current recommendation lists, unless the preview data sets them.
            lists = (
                await recommendations_repo.get(uow.session, body.customer_id)
                if body.customer_id and "recommendations" not in body.data
                else None
            )
        if template is None:
            raise ApiError(404, "not_found", f"no template {template_id!r}")
        if body.customer_id and contact is None:
            raise ApiError(
                404,
                "not_found",
                f"no known customer {body.customer_id!r}",
                errors=[
                    field_error("customer_id", "exists", "the notifier has no profile for this customer")
                ],
            )
        request = MessageRequested(
            message_id=f"preview-{uuid.uuid4().hex}",
            customer_id=body.customer_id or "sample-customer",
            channel=template.channel,
            template_id=template_id,
            category=body.category,
            subscription_topic=body.subscription_topic,
            recipient=Recipient(locale=body.locale),
            data=body.data if lists is None else {**body.data, "recommendations": lists},
            requested_at=notifier.clock.now(),
        )
        links = _PreviewLinks(notifier.links.signer, notifier.links.base_url)
        data = template_data(request, contact, links, recipient_address(request, contact))
        try:
            rendered = notifier.renderer.render(template, body.locale or data["customer"]["locale"], data)
        except RenderError as exc:
            raise ApiError(
                422, "render_failed", str(exc), errors=[field_error("template", "render", str(exc))]
            ) from exc
        return {"template_id": template_id, "locale": rendered.locale, "parts": rendered.parts}

    @api.post("/{template_id}/test-send", status_code=202)
    async def test_send(template_id: str, body: TestSendBody, notifier: NotifierDep) -> dict[str, Any]:
        check_template_data(body.data)
        async with notifier.platform.unit_of_work() as uow:
            template = await templates_repo.get_definition(uow.session, template_id)
        if template is None:
            raise ApiError(404, "not_found", f"no template {template_id!r}")
        # A test goes to the address given, never to a customer's own: a real customer id without
        # one would mail that customer.
        field = _ADDRESS_FIELD.get(template.channel)
        if field is not None and not getattr(body.recipient, field):
            raise ApiError(
                400,
                "invalid_request",
                f"a test send needs recipient.{field}",
                errors=[
                    field_error(
                        f"recipient.{field}", "missing", f"the {template.channel.value} address to test with"
                    )
                ],
            )
        request = MessageRequested(
            message_id=f"test-{uuid.uuid4().hex}",
            customer_id=body.customer_id,
            channel=template.channel,
            template_id=template_id,
            category=MessageCategory.TRANSACTIONAL,
            recipient=body.recipient,
            data=body.data,
            requested_at=notifier.clock.now(),
        )
        await notifier.submit([request])
        return {"message_id": request.message_id, "status": "queued"}

    return api
