"""Consent decisions at send time."""

from __future__ import annotations

from services.notifier.domain.consent import ALL_TOPICS, SubscriptionTopic, decide, opted_out
from shared.contracts import Channel, MessageCategory

NEWS = SubscriptionTopic("news", "News", ("email",), default_subscribed=True)
PROMO = SubscriptionTopic("promo", "Promo", ("email", "sms"), default_subscribed=False)
M, T = MessageCategory.MARKETING, MessageCategory.TRANSACTIONAL


def test_transactional_is_exempt_even_when_unsubscribed_from_everything() -> None:
    assert decide(T, Channel.EMAIL, "news", NEWS, {(ALL_TOPICS, "email"): False}).allowed


def test_opt_out_topics_send_until_the_customer_says_no() -> None:
    assert decide(M, Channel.EMAIL, "news", NEWS, {}).allowed
    no = decide(M, Channel.EMAIL, "news", NEWS, {("news", "email"): False})
    assert not no.allowed and no.reason == "unsubscribed from 'news' on email"


def test_opt_in_topics_need_a_yes() -> None:
    assert not decide(M, Channel.SMS, "promo", PROMO, {}).allowed
    assert decide(M, Channel.SMS, "promo", PROMO, {("promo", "sms"): True}).allowed
    # a yes on email is not a yes on sms
    assert not decide(M, Channel.SMS, "promo", PROMO, {("promo", "email"): True}).allowed


def test_channel_wide_opt_out_beats_topic_opt_in() -> None:
    choices = {("promo", "sms"): True, (ALL_TOPICS, "sms"): False}
    decision = decide(M, Channel.SMS, "promo", PROMO, choices)
    assert not decision.allowed and "all sms" in (decision.reason or "")


def test_unknown_topic_or_channel_is_suppressed() -> None:
    assert not decide(M, Channel.EMAIL, "ghost", None, {}).allowed
    assert not decide(M, Channel.SMS, "news", NEWS, {}).allowed
    assert decide(M, Channel.EMAIL, None, None, {}).allowed


def test_what_a_change_of_choices_opts_out_of_is_what_stops_reaching_the_customer() -> None:
    tips = SubscriptionTopic("tips", "Tips", ("email",), default_subscribed=True)
    topics = [NEWS, PROMO, tips]
    # Unticking an opt-out topic opts out of it; an opt-in topic never joined is not an opt-out.
    before: dict[tuple[str, str], bool] = {}
    after = {("news", "email"): False, ("promo", "email"): False, ("tips", "email"): True}
    assert opted_out(topics, Channel.EMAIL, before, after) == ["news"]
    # Leaving an opt-in topic one had joined is one.
    joined = {("promo", "email"): True}
    assert opted_out(topics, Channel.EMAIL, joined, {("promo", "email"): False}) == ["promo"]
    # Already off through "unsubscribe from all": recording the topics off changes nothing received.
    all_off = {(ALL_TOPICS, "email"): False}
    assert opted_out(topics, Channel.EMAIL, all_off, {**all_off, ("tips", "email"): False}) == []
    # Re-subscribing is not an opt-out.
    assert opted_out(topics, Channel.EMAIL, after, before) == []
