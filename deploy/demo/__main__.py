"""`make demo` (or `python -m deploy.demo`): seed a running platform and stream simulated customers.

Start the platform first with `make run` (another terminal). Then watch:
  - mails arriving:      python -m deploy.local.smtp_sink --list      (files in var/mail/)
  - journeys' node counts: curl -H 'Authorization: Bearer dev-admin-token' \
                           localhost:8003/v1/journeys/demo-abandoned-cart/stats
  - segments filling:    curl -H 'Authorization: Bearer dev-admin-token' localhost:8002/v1/segments
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import httpx

from deploy.demo import seed
from deploy.demo.simulate import events


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.admin = {"Authorization": f"Bearer {args.admin_token}"}
        self.client = httpx.AsyncClient(timeout=30)

    def url(self, service: str, path: str) -> str:
        base: str = {
            "ingest": self.args.ingest,
            "segmenter": self.args.segmenter,
            "journeys": self.args.journeys,
            "notifier": self.args.notifier,
        }[service]
        return base.rstrip("/") + path

    async def check(self, r: httpx.Response, what: str, ok: tuple[int, ...] = (200, 201, 202, 204)) -> Any:
        if r.status_code not in ok:
            raise SystemExit(f"demo: {what} failed: {r.status_code} {r.text[:500]}")
        return r.json() if r.content else None

    async def seed(self) -> str:
        for topic_id, body in seed.TOPICS.items():
            r = await self.client.put(
                self.url("notifier", f"/v1/subscription-topics/{topic_id}"), headers=self.admin, json=body
            )
            await self.check(r, f"subscription topic {topic_id}")
        for template in seed.TEMPLATES:
            r = await self.client.post(
                self.url("notifier", "/v1/templates"), headers=self.admin, json=template
            )
            if r.status_code == 409:
                body = {k: v for k, v in template.items() if k != "id"}
                r = await self.client.put(
                    self.url("notifier", f"/v1/templates/{template['id']}"), headers=self.admin, json=body
                )
            await self.check(r, f"template {template['id']}")
        print(f"demo: {len(seed.TOPICS)} subscription topics, {len(seed.TEMPLATES)} templates", flush=True)
        r = await self.client.put(
            self.url("segmenter", "/v1/lifecycle/stages"),
            headers=self.admin,
            json={"thresholds": seed.LIFECYCLE_THRESHOLDS},
        )
        await self.check(r, "lifecycle stage thresholds")

        existing = await self.check(
            await self.client.get(self.url("segmenter", "/v1/segments"), headers=self.admin), "list segments"
        )
        by_name = {
            s["name"]: s["id"]
            for s in (existing.get("segments", existing) if isinstance(existing, dict) else existing)
        }
        segment_ids: dict[str, str] = {}
        for key, body in seed.SEGMENTS.items():
            if body["name"] in by_name:
                segment_ids[key] = by_name[body["name"]]
                continue
            created = await self.check(
                await self.client.post(self.url("segmenter", "/v1/segments"), headers=self.admin, json=body),
                f"segment {key}",
            )
            segment_ids[key] = created["id"]
        print(f"demo: {len(segment_ids)} segments", flush=True)

        for journey_id, definition in seed.journeys(segment_ids).items():
            r = await self.client.get(self.url("journeys", f"/v1/journeys/{journey_id}"), headers=self.admin)
            if r.status_code == 404:
                await self.check(
                    await self.client.post(
                        self.url("journeys", "/v1/journeys"),
                        headers=self.admin,
                        json={"id": journey_id, "definition": definition},
                    ),
                    f"journey {journey_id}",
                )
            status = (
                await self.check(
                    await self.client.get(
                        self.url("journeys", f"/v1/journeys/{journey_id}"), headers=self.admin
                    ),
                    f"journey {journey_id}",
                )
            ).get("status")
            if status != "active":
                await self.check(
                    await self.client.post(
                        self.url("journeys", f"/v1/journeys/{journey_id}/activate"), headers=self.admin
                    ),
                    f"activate {journey_id}",
                )
        print(f"demo: {len(seed.journeys(segment_ids))} journeys active", flush=True)

        key = await self.check(
            await self.client.post(
                self.url("ingest", "/admin/write-keys"),
                headers=self.admin,
                json={"name": f"demo {time.strftime('%Y-%m-%d %H:%M')}"},
            ),
            "write key",
        )
        return str(key["key"])

    async def stream(self, write_key: str) -> None:
        all_events = events(self.args.customers, seed=self.args.seed, days=self.args.days)
        batches = [all_events[i : i + 100] for i in range(0, len(all_events), 100)]
        queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
        for b in batches:
            queue.put_nowait(b)
        sent = 0
        started = time.monotonic()

        async def worker() -> None:
            nonlocal sent
            while not queue.empty():
                batch = queue.get_nowait()
                for attempt in range(20):
                    try:
                        r = await self.client.post(
                            self.url("ingest", "/v1/batch"), json={"batch": batch}, auth=(write_key, "")
                        )
                        if r.status_code in (200, 207):
                            break
                        retry = float(r.headers.get("Retry-After", "1"))
                    except httpx.TransportError:
                        retry = 1.0
                    await asyncio.sleep(min(retry, 5) * (attempt + 1) / 2)
                sent += len(batch)
                progress(sent, len(all_events), started)

        await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))
        print(file=sys.stderr)
        elapsed = time.monotonic() - started
        print(
            f"demo: {len(all_events)} events for {self.args.customers} customers in {elapsed:.1f}s "
            f"({len(all_events) / elapsed:.0f} events/s)",
            flush=True,
        )
        await self.refit_lifecycle(all_events[-1])

    async def refit_lifecycle(self, last: dict[str, Any]) -> None:
        """Once the segmenter holds the stream (its last event is in a timeline), fit the lifecycle
        models (BG/NBD, Gamma-Gamma) on the whole base now rather than at the segmenter's next try
        (minutes away on a fresh platform): P(alive), churn risk and CLV then show at once, in
        profiles and the CLV KPI, and stages are recomputed with them."""
        customer = last.get("userId") or last.get("anonymousId")
        timeline = self.url("segmenter", f"/v1/customers/{customer}/events")
        for _ in range(120):
            r = await self.client.get(timeline, headers=self.admin, params={"limit": 5})
            if r.status_code == 200 and any(e["message_id"] == last["messageId"] for e in r.json()["events"]):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)  # the other partitions' last batches
        r = await self.client.post(self.url("segmenter", "/v1/lifecycle/refit"), headers=self.admin)
        if r.status_code != 200:
            print(f"demo: lifecycle refit refused ({r.status_code}): {r.text[:200]}", flush=True)
            return
        fit = r.json()
        print(
            f"demo: lifecycle models fitted on {fit['customers']} customers: "
            f"{fit['stage_changes']} stage changes",
            flush=True,
        )


def progress(done: int, total: int, started: float) -> None:
    width = 40
    filled = int(width * done / total)
    rate = done / max(1e-6, time.monotonic() - started)
    sys.stderr.write(
        f"\r[{'#' * filled}{' ' * (width - filled)}] {done * 100 // total:3d}% "
        f"{done}/{total} events  {rate:,.0f}/s"
    )
    sys.stderr.flush()


async def main(args: argparse.Namespace) -> None:
    demo = Demo(args)
    try:
        write_key = await demo.seed()
        if not args.seed_only:
            await demo.stream(write_key)
    finally:
        await demo.client.aclose()
    auth = f"curl -H 'Authorization: Bearer {args.admin_token}'"
    print(
        "\nWhat to look at now:\n"
        "  mails:     .venv/bin/python -m deploy.local.smtp_sink --list\n"
        f"  journeys:  {auth} {args.journeys}/v1/journeys/demo-abandoned-cart/stats\n"
        f"  segments:  {auth} {args.segmenter}/v1/segments\n"
        f"  KPIs:      {auth} {args.segmenter}/v1/kpis/retention\n"
        "Welcome tips follow 2 minutes after sign-up, cart reminders 1 minute after an abandoned cart,\n"
        "cross-sell offers 3 minutes after a first order, NPS surveys 1 minute after an order.",
        flush=True,
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m deploy.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--customers", type=int, default=3000)
    p.add_argument("--days", type=int, default=30, help="history to simulate, ending now")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument(
        "--seed-only", action="store_true", help="create topics, templates, segments, journeys only"
    )
    p.add_argument("--admin-token", default="dev-admin-token")
    p.add_argument("--ingest", default="http://127.0.0.1:8001")
    p.add_argument("--segmenter", default="http://127.0.0.1:8002")
    p.add_argument("--journeys", default="http://127.0.0.1:8003")
    p.add_argument("--notifier", default="http://127.0.0.1:8004")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
