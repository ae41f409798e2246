"""Admin API for write keys (Authorization: Bearer <CLM_ADMIN_TOKEN>): create, list, revoke."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from services.ingest.settings import IngestSettings
from services.ingest.store.write_keys import WriteKeyRecord
from services.ingest.write_keys import WriteKeys
from shared.http import ApiError, admin_guard


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True)


class CreateWriteKey(_Camel):
    name: str = Field(min_length=1, max_length=200)


class WriteKeyView(_Camel):
    id: str
    name: str
    prefix: str = Field(
        description="The key's first characters, to recognize it; the key itself is never shown"
    )
    created_at: datetime
    revoked_at: datetime | None = None

    @classmethod
    def of(cls, record: WriteKeyRecord) -> WriteKeyView:
        return cls(
            id=record.id,
            name=record.name,
            prefix=record.prefix,
            created_at=record.created_at,
            revoked_at=record.revoked_at,
        )


class CreatedWriteKeyView(WriteKeyView):
    key: str = Field(description="The write key: shown this once, stored only as a digest")


def write_keys_router(settings: IngestSettings, write_keys: WriteKeys) -> APIRouter:
    router = APIRouter(
        prefix="/admin/write-keys", tags=["write keys"], dependencies=[Depends(admin_guard(settings))]
    )

    @router.post("", status_code=201, response_model=CreatedWriteKeyView)
    async def create(body: CreateWriteKey) -> CreatedWriteKeyView:
        created = await write_keys.create(body.name)
        return CreatedWriteKeyView(**WriteKeyView.of(created.record).model_dump(), key=created.key)

    @router.get("", response_model=list[WriteKeyView])
    async def list_keys() -> list[WriteKeyView]:
        return [WriteKeyView.of(r) for r in await write_keys.list()]

    @router.delete("/{key_id}", response_model=WriteKeyView)
    async def revoke(key_id: str) -> WriteKeyView:
        if await write_keys.revoke(key_id) is None:
            raise ApiError(404, "not_found", f"no write key {key_id}")
        found = next((r for r in await write_keys.list() if r.id == key_id), None)
        assert found is not None
        return WriteKeyView.of(found)

    return router
