"""Routes a delivery to its channel's providers in order: rate-limited, circuit-broken, with failover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.notifier.channels.base import (
    BeforeCall,
    CallProgress,
    Delivery,
    Provider,
    SendAborted,
    SendResult,
)
from services.notifier.channels.http_providers import FcmProvider, TwilioProvider
from services.notifier.channels.in_app import InAppProvider
from services.notifier.channels.smtp import SmtpProvider
from services.notifier.channels.webhook import WebhookProvider
from services.notifier.domain.address_policy import AddressPolicy
from services.notifier.domain.provider_guards import CircuitBreaker, TokenBucket
from services.notifier.domain.retry_policy import Failure
from services.notifier.settings import NotifierSettings
from shared.clock import Clock
from shared.contracts import Channel
from shared.db.unit_of_work import UnitOfWork

# Failures after which the next provider is tried right away; a refused message would be refused there too.
_FAIL_OVER_ON = frozenset({Failure.TRANSIENT, Failure.PROVIDER})


def _outcome_unknown(provider: Provider, what: str) -> SendResult:
    """An unexpected error once the provider's call may have delivered the message (an HTTP request
    gone out, e.g. Twilio accepted it and its answer failed to decode; SMTP once DATA started).
    No failover: the backup would deliver it a second time, every time the error recurs. Retried only
    where the provider drops a repeated call for the same message (`idempotent`: the in-app inbox);
    else, as a crash during the call (`unknown`), never resent: Twilio documents no idempotency for
    its Messages API (`I-Twilio-Idempotency-Token` is what Twilio sends on its own webhooks), so a
    retry on the same provider would duplicate the SMS too."""
    if getattr(provider, "idempotent", False):
        return SendResult.failed(Failure.TRANSIENT, what)
    return SendResult.failed(
        Failure.PERMANENT,
        f"outcome unknown: {what}; not resent (the provider may have sent it: at most once)",
    )


class GuardedProvider:
    def __init__(
        self, provider: Provider, breaker: CircuitBreaker, bucket: TokenBucket, max_in_flight: int = 64
    ) -> None:
        self.provider = provider
        self.breaker = breaker
        self.bucket = bucket
        self._lock = asyncio.Lock()
        # Calls in flight, as many as the provider's own pool allows: a call that gets past this
        # (and past the rate limiter) starts at once, so `before_call` marks only real calls `sending`.
        self.slots = asyncio.Semaphore(max(1, max_in_flight))

    @property
    def name(self) -> str:
        return self.provider.name

    async def wait_for_token(self) -> None:
        # Reserve under a lock so concurrent senders queue up instead of bursting past the rate.
        async with self._lock:
            wait = self.bucket.reserve(time.monotonic())
        if wait > 0:
            await asyncio.sleep(wait)


class ProviderRouter:
    def __init__(
        self, routes: dict[Channel, list[GuardedProvider]], all_providers: list[GuardedProvider]
    ) -> None:
        self.routes = routes
        self.all_providers = all_providers

    @classmethod
    def from_settings(
        cls, settings: NotifierSettings, unit_of_work: Callable[[], UnitOfWork], clock: Clock
    ) -> ProviderRouter:
        configs = settings.provider_configs()
        policy = AddressPolicy(settings.webhook_allow_list)
        built: dict[str, GuardedProvider] = {}
        for name, config in configs.items():
            provider: Provider
            if config.kind == "smtp":
                provider = SmtpProvider(name, config)
            elif config.kind == "twilio":
                provider = TwilioProvider(
                    name,
                    config,
                    status_callback=f"{settings.public_base_url.rstrip('/')}/v1/inbound/twilio/status",
                )
            elif config.kind == "fcm":
                provider = FcmProvider(name, config)
            elif config.kind == "webhook":
                provider = WebhookProvider(
                    name,
                    config,
                    secret=settings.webhook_secret.get_secret_value(),
                    policy=policy,
                    max_redirects=settings.webhook_max_redirects,
                )
            else:
                provider = InAppProvider(name, unit_of_work, clock)
            built[name] = GuardedProvider(
                provider,
                CircuitBreaker(settings.circuit_failure_threshold, settings.circuit_cooldown_s),
                TokenBucket(config.rate_per_s, config.burst),
                SmtpProvider.max_in_flight(config) if config.kind == "smtp" else config.concurrency,
            )
        routes: dict[Channel, list[GuardedProvider]] = {}
        for channel_name, names in settings.channel_providers.items():
            missing = [n for n in names if n not in built]
            if missing:
                raise ValueError(f"channel {channel_name} lists unknown providers {missing}")
            routes[Channel(channel_name)] = [built[n] for n in names]
        return cls(routes, list(built.values()))

    async def send(
        self, delivery: Delivery, before_call: BeforeCall | None = None
    ) -> tuple[str | None, SendResult]:
        """(provider that decided, result). Tries providers in order while failures are worth it.

        `before_call` runs once, right before the first provider call (after a connection slot and
        the rate limiter; for SMTP right before DATA): the delivery loop commits `sending` there. If it
        raises `SendAborted`, nothing is sent and the error propagates.
        """
        providers = self.routes.get(delivery.channel, [])
        if not providers:
            return None, SendResult.failed(
                Failure.PERMANENT, f"no provider configured for {delivery.channel}"
            )
        last: tuple[str | None, SendResult] | None = None
        hook_ran = False
        hook_failed = False

        async def run_hook_once() -> None:
            nonlocal hook_ran, hook_failed
            hook_ran = True
            assert before_call is not None
            try:
                await before_call()
            except SendAborted:
                raise
            except Exception:
                hook_failed = True
                raise

        for guarded in providers:
            if not guarded.breaker.allows(time.monotonic()):
                last = last or (
                    guarded.name,
                    SendResult.failed(Failure.TRANSIENT, f"{guarded.name}: circuit open"),
                )
                continue
            # Whether this provider's call may have delivered something: marked by the provider at its
            # point of no return (SMTP right before DATA, HTTP as the request is sent); for one that
            # does not say, as soon as its call starts.
            progress = CallProgress()
            async with guarded.slots:
                await guarded.wait_for_token()
                # Until it has run: a primary SMTP server refusing the connection never reached DATA,
                # so the backup must still mark the row `sending` before its own DATA.
                hook = run_hook_once if before_call is not None and not hook_ran else None
                try:
                    if isinstance(guarded.provider, SmtpProvider):
                        # SMTP runs it later, before DATA (connecting cannot deliver anything).

                        async def before_data(hook: BeforeCall | None = hook) -> None:
                            if hook is not None:
                                await hook()

                        result = await guarded.provider.send(
                            delivery, before_data=before_data, progress=progress
                        )
                    else:
                        if hook is not None:
                            await hook()
                        if getattr(guarded.provider, "marks_progress", False):
                            result = await guarded.provider.send(delivery, progress=progress)  # type: ignore[call-arg]
                        else:
                            progress.sending()
                            result = await guarded.provider.send(delivery)
                except SendAborted:
                    # Nothing was sent: a half-open breaker's trial must not stay "in flight" for ever
                    # (every later send on the channel failed "circuit open" until a restart).
                    guarded.breaker.release_trial()
                    raise
                except Exception as exc:  # a bug must not take the delivery loop down
                    what = f"{guarded.name}: {type(exc).__name__}: {exc}"
                    if hook_failed:
                        # The caller's `sending` commit, not the provider: nothing was sent. Retried,
                        # not failed over (a backup would send without it), not held against anyone.
                        guarded.breaker.release_trial()
                        return guarded.name, SendResult.failed(Failure.TRANSIENT, what)
                    if not progress.may_have_sent:
                        # Before the point of no return nothing was handed over: retried, and the next
                        # provider tried. Not counted: no answer of the provider's explains it, so it
                        # is more likely a bug of ours (or a library's) than the provider failing, and
                        # one message hitting it again and again must not open the circuit for all.
                        guarded.breaker.release_trial()
                        last = (guarded.name, SendResult.failed(Failure.TRANSIENT, what))
                        continue
                    # The provider may have delivered it (its answer failed to decode, the connection
                    # dropped before the answer): counted, and not sent again.
                    guarded.breaker.record_failure(time.monotonic())
                    return guarded.name, _outcome_unknown(guarded.provider, what)
            if result.ok or result.failure in (Failure.PERMANENT, Failure.BOUNCE):
                # The provider worked (even if it refused this message): the circuit stays closed.
                guarded.breaker.record_success()
                return guarded.name, result
            guarded.breaker.record_failure(time.monotonic())
            last = (guarded.name, result)
            if result.failure not in _FAIL_OVER_ON:
                break
        assert last is not None
        return last

    async def close(self) -> None:
        for guarded in self.all_providers:
            await guarded.provider.close()
