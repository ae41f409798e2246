"""NPS / CSAT arithmetic and the `Survey Responded` event convention."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.segmenter.domain.lifecycle import voice
from services.segmenter.domain.lifecycle.voice import NpsCategory, SurveyError, SurveyType


@pytest.mark.parametrize(
    ("score", "category"),
    [(0, "detractor"), (6, "detractor"), (7, "passive"), (8, "passive"), (9, "promoter"), (10, "promoter")],
)
def test_nps_categories(score: int, category: str) -> None:
    assert voice.nps_category(score) == NpsCategory(category)


def test_nps_by_hand() -> None:
    # 3 promoters, 2 passives, 5 detractors of 10: 30% - 50% = -20.
    summary = voice.nps([10, 9, 9, 8, 7, 6, 5, 3, 0, 1])
    assert (summary.promoters, summary.passives, summary.detractors, summary.responses) == (3, 2, 5, 10)
    assert summary.nps == pytest.approx(-20.0)


def test_all_promoters_is_100() -> None:
    assert voice.nps([9, 10, 10]).nps == 100.0


def test_all_detractors_is_minus_100_and_all_passives_is_0() -> None:
    assert voice.nps([0, 6]).nps == -100.0
    assert voice.nps([7, 8]).nps == 0.0


def test_no_answers_means_no_nps() -> None:
    summary = voice.nps([])
    assert summary.nps is None
    assert summary.as_json() == {"responses": 0, "promoters": 0, "passives": 0, "detractors": 0, "nps": None}


def test_csat_by_hand() -> None:
    # 4s and 5s are satisfied: 3 of 5 = 60%.
    summary = voice.csat([5, 4, 4, 3, 1])
    assert (summary.satisfied, summary.responses) == (3, 5)
    assert summary.csat == pytest.approx(60.0)
    assert voice.csat([]).csat is None
    assert voice.csat([5, 5]).csat == 100.0


def test_out_of_range_scores_are_errors() -> None:
    with pytest.raises(SurveyError):
        voice.nps([11])
    with pytest.raises(SurveyError):
        voice.csat([0])


NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_parse_an_nps_answer() -> None:
    answer = voice.parse_survey_response(
        "Survey Responded", {"survey_type": "nps", "score": 9, "comment": " Great ", "survey_id": "q1"}, NOW
    )
    assert answer is not None
    assert answer.survey_type is SurveyType.NPS
    assert answer.score == 9
    assert answer.nps_category is NpsCategory.PROMOTER
    assert answer.comment == "Great"
    assert answer.survey_id == "q1"
    assert answer.answered_at == NOW


def test_parse_a_csat_answer_from_a_score_link_string() -> None:
    answer = voice.parse_survey_response("Survey Responded", {"survey_type": "CSAT", "score": "4"})
    assert answer is not None
    assert answer.survey_type is SurveyType.CSAT
    assert answer.score == 4
    assert answer.nps_category is None
    assert answer.comment is None


def test_other_events_are_not_surveys() -> None:
    assert voice.parse_survey_response("Order Completed", {"score": 9}) is None
    assert voice.parse_survey_response(None, {}) is None


@pytest.mark.parametrize(
    ("properties", "field", "rule"),
    [
        ({"score": 9}, "properties.survey_type", "enum"),
        ({"survey_type": "ces", "score": 9}, "properties.survey_type", "enum"),
        ({"survey_type": "nps"}, "properties.score", "integer"),
        ({"survey_type": "nps", "score": 9.5}, "properties.score", "integer"),
        ({"survey_type": "nps", "score": True}, "properties.score", "integer"),
        ({"survey_type": "nps", "score": "nine"}, "properties.score", "integer"),
        ({"survey_type": "nps", "score": 11}, "properties.score", "range"),
        ({"survey_type": "csat", "score": 0}, "properties.score", "range"),
        ({"survey_type": "csat", "score": 6}, "properties.score", "range"),
    ],
)
def test_invalid_answers_name_the_field_and_the_rule(
    properties: dict[str, Any], field: str, rule: str
) -> None:
    with pytest.raises(SurveyError) as raised:
        voice.parse_survey_response("Survey Responded", properties)
    assert (raised.value.field, raised.value.rule) == (field, rule)


@pytest.mark.parametrize(
    ("extra", "comment", "survey_id", "adjusted"),
    [
        ({"survey_id": 3}, None, "3", [("properties.survey_id", "string", "converted")]),
        ({"survey_id": 3.0}, None, "3", [("properties.survey_id", "string", "converted")]),
        ({"survey_id": {"id": 3}}, None, None, [("properties.survey_id", "string", "dropped")]),
        ({"survey_id": True}, None, None, [("properties.survey_id", "string", "dropped")]),
        ({"comment": 12}, None, None, [("properties.comment", "string", "dropped")]),
        ({"comment": " " + "x" * 2000 + " "}, "x" * 2000, None, []),  # trimmed first
        ({"comment": "y" * 2500}, "y" * 2000, None, [("properties.comment", "max_length", "truncated")]),
    ],
)
def test_optional_properties_never_cost_the_answer(
    extra: dict[str, Any], comment: str | None, survey_id: str | None, adjusted: list[tuple[str, str, str]]
) -> None:
    answer = voice.parse_survey_response("Survey Responded", {"survey_type": "nps", "score": 5, **extra})
    assert answer is not None and answer.score == 5
    assert (answer.comment, answer.survey_id, list(answer.adjusted)) == (comment, survey_id, adjusted)
