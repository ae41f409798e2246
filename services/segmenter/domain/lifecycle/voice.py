"""Voice of the customer: NPS and CSAT surveys.

Convention: a survey answer is a `track` event named `Survey Responded` with properties
`survey_type` ("nps" or "csat"), `score` (an integer: 0-10 for NPS, 1-5 for CSAT), optional
`comment` (string, at most 2,000 characters) and optional `survey_id` (string). Anything else in
`properties` is ignored. An answer without a usable type or score raises `SurveyError` naming the
field and the rule (it cannot count). The optional fields never cost the answer: a numeric
`survey_id` becomes its text, a longer comment is cut at 2,000 characters, a comment or survey id of
another type is left out; each such change is listed in `SurveyResponse.adjusted`.

- NPS category: promoter 9-10, passive 7-8, detractor 0-6.
- NPS = % promoters - % detractors, in [-100, 100] (None without answers).
- CSAT = % of answers scoring 4 or 5 on 1-5, in [0, 100] (None without answers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

SURVEY_EVENT = "Survey Responded"
MAX_COMMENT_CHARS = 2000


class SurveyType(StrEnum):
    NPS = "nps"
    CSAT = "csat"


class NpsCategory(StrEnum):
    PROMOTER = "promoter"
    PASSIVE = "passive"
    DETRACTOR = "detractor"


SCORE_RANGE = {SurveyType.NPS: (0, 10), SurveyType.CSAT: (1, 5)}


class SurveyError(ValueError):
    """An invalid survey answer; `field` and `rule` are what a 400 response names."""

    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule
        self.message = message


@dataclass(frozen=True)
class SurveyResponse:
    survey_type: SurveyType
    score: int
    comment: str | None
    survey_id: str | None
    answered_at: datetime | None
    # (field, rule, what was done: "truncated" | "converted" | "dropped") for each optional property
    # that was not used as sent.
    adjusted: tuple[tuple[str, str, str], ...] = ()

    @property
    def nps_category(self) -> NpsCategory | None:
        return nps_category(self.score) if self.survey_type is SurveyType.NPS else None


def nps_category(score: int) -> NpsCategory:
    if not 0 <= score <= 10:
        raise SurveyError("score", "range", "an NPS score is an integer from 0 to 10")
    if score >= 9:
        return NpsCategory.PROMOTER
    if score >= 7:
        return NpsCategory.PASSIVE
    return NpsCategory.DETRACTOR


def parse_survey_response(
    event_name: str | None, properties: Mapping[str, Any], answered_at: datetime | None = None
) -> SurveyResponse | None:
    """The survey answer carried by a track event; None when the event is not `Survey Responded`."""
    if event_name != SURVEY_EVENT:
        return None
    raw_type = properties.get("survey_type")
    if not isinstance(raw_type, str) or raw_type.strip().lower() not in {t.value for t in SurveyType}:
        raise SurveyError("properties.survey_type", "enum", "survey_type must be 'nps' or 'csat'")
    survey_type = SurveyType(raw_type.strip().lower())

    raw_score = properties.get("score")
    # Accept 9, 9.0 and "9" (score links often put it in a query string) but never 9.5 or True.
    if isinstance(raw_score, bool):
        raise SurveyError("properties.score", "integer", "score must be an integer")
    if isinstance(raw_score, str):
        try:
            raw_score = int(raw_score.strip())
        except ValueError:
            raise SurveyError("properties.score", "integer", "score must be an integer") from None
    if isinstance(raw_score, float) and raw_score.is_integer():
        raw_score = int(raw_score)
    if not isinstance(raw_score, int):
        raise SurveyError("properties.score", "integer", "score must be an integer")
    low, high = SCORE_RANGE[survey_type]
    if not low <= raw_score <= high:
        raise SurveyError(
            "properties.score", "range", f"a {survey_type.value} score is an integer from {low} to {high}"
        )

    adjusted: list[tuple[str, str, str]] = []
    comment = properties.get("comment")
    if comment is not None and not isinstance(comment, str):
        adjusted.append(("properties.comment", "string", "dropped"))
        comment = None
    if comment is not None:
        comment = comment.strip()
        if len(comment) > MAX_COMMENT_CHARS:
            adjusted.append(("properties.comment", "max_length", "truncated"))
            comment = comment[:MAX_COMMENT_CHARS].rstrip()
    survey_id = properties.get("survey_id")
    if isinstance(survey_id, float) and survey_id.is_integer():
        survey_id = int(survey_id)
    if isinstance(survey_id, int) and not isinstance(survey_id, bool):
        adjusted.append(("properties.survey_id", "string", "converted"))  # survey tools number them
        survey_id = str(survey_id)
    elif survey_id is not None and not isinstance(survey_id, str):
        adjusted.append(("properties.survey_id", "string", "dropped"))
        survey_id = None
    return SurveyResponse(
        survey_type=survey_type,
        score=raw_score,
        comment=comment or None,
        survey_id=survey_id,
        answered_at=answered_at,
        adjusted=tuple(adjusted),
    )


@dataclass(frozen=True)
class NpsSummary:
    responses: int
    promoters: int
    passives: int
    detractors: int
    nps: float | None  # None when there are no responses

    def as_json(self) -> dict[str, Any]:
        return {
            "responses": self.responses,
            "promoters": self.promoters,
            "passives": self.passives,
            "detractors": self.detractors,
            "nps": self.nps,
        }


def nps(scores: Iterable[int]) -> NpsSummary:
    promoters = passives = detractors = 0
    for value in scores:
        category = nps_category(value)
        if category is NpsCategory.PROMOTER:
            promoters += 1
        elif category is NpsCategory.PASSIVE:
            passives += 1
        else:
            detractors += 1
    total = promoters + passives + detractors
    score = 100.0 * (promoters - detractors) / total if total else None
    return NpsSummary(total, promoters, passives, detractors, score)


@dataclass(frozen=True)
class CsatSummary:
    responses: int
    satisfied: int
    csat: float | None  # None when there are no responses

    def as_json(self) -> dict[str, Any]:
        return {"responses": self.responses, "satisfied": self.satisfied, "csat": self.csat}


def csat(scores: Iterable[int]) -> CsatSummary:
    total = satisfied = 0
    for value in scores:
        if not 1 <= value <= 5:
            raise SurveyError("score", "range", "a CSAT score is an integer from 1 to 5")
        total += 1
        satisfied += value >= 4
    return CsatSummary(total, satisfied, 100.0 * satisfied / total if total else None)
