"""The sample generator: a deterministic stream of CRM, help-desk and chat
events (the bundled ``events.jsonl`` is ``generate_events(BUNDLED_COUNT)``)."""

from __future__ import annotations

import json
import os
import random
import sys
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

__all__ = ["BUNDLED_COUNT", "BUNDLED_EVENTS", "generate_events", "write_events"]

BUNDLED_EVENTS = Path(__file__).with_name("events.jsonl")
"""The sample stream shipped with the package (``generate_events(BUNDLED_COUNT)``)."""
BUNDLED_COUNT = 400

# fmt: off
_FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken", "Radia",
          "Linus", "Frances", "John"]
_LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Hamilton", "Thompson",
         "Perlman", "Allen"]
_ORGS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Tyrell",
         "Cyberdyne", "Aperture", "Wonka"]
# fmt: on
_ORG_SUFFIXES = ["Corp", "Inc", "Labs", "GmbH", "Ltd"]
_SUBJECTS = [
    "Cannot log in",
    "Invoice is wrong",
    "Export to CSV fails",
    "No password reset mail",
    "Feature request: dark mode",
    "App crashes on start",
    "Dashboard is slow",
    "Refund request",
    "Help with SSO setup",
    "API rate limit exceeded",
]
_PLANS = ["free", "team", "business", "enterprise"]
_COUNTRIES = ["DE", "FR", "US", "GB", "JP", "BR", "IN", "NL"]
_ROLES = ["customer", "customer", "customer", "agent", "admin"]
_PRESENCE = ["online", "away", "offline"]
_PRIORITIES = ["low", "normal", "normal", "high", "urgent"]
_NEXT_STATUS = {"open": "pending", "pending": "solved", "solved": "closed"}


class _Pool:
    """Ids to pick from at random: O(1) add, remove and choice, deterministic order."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item: str) -> bool:
        return item in self.index

    def add(self, item: str) -> None:
        if item not in self.index:
            self.index[item] = len(self.items)
            self.items.append(item)

    def discard(self, item: str) -> None:
        i = self.index.pop(item, None)
        if i is not None:
            last = self.items.pop()
            if last != item:
                self.items[i] = last
                self.index[last] = i

    def choice(self, rng: random.Random) -> str:
        return self.items[rng.randrange(len(self.items))]


class _World:
    """The simulated CRM behind :func:`generate_events`.  It tracks what
    exists so that events mostly make sense; a few, as in real streams, are
    redelivered or arrive after their entity was deleted."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.state: dict[str, dict[str, Any]] = {}  # id -> {"kind", "name", "attrs"}
        self.pools = {kind: _Pool() for kind in ("org", "user", "ticket", "agent", "closed")}
        self.members: dict[str, dict[str, None]] = {}  # org -> its users and tickets
        self.slugs: set[str] = set()
        self.gone_tickets: list[str] = []
        self.queue: deque[dict[str, Any]] = deque()
        self.next_user = 1001
        self.next_ticket = 5001
        self.actions: list[Callable[[], dict[str, Any] | None]] = [
            self.new_ticket,
            self.progress_ticket,
            self.assign_ticket,
            self.presence,
            self.change_user,
            self.change_org,
            self.redeliver,
            self.delete_ticket,
            self.delete_user,
            self.delete_org,
            self.late_patch,
        ]
        self.weights = [22, 22, 8, 14, 4, 4, 8, 6, 2, 0.4, 1]

    # -- bookkeeping -------------------------------------------------------------

    def _track(self, entity_id: str) -> None:
        s = self.state[entity_id]
        kind, attrs = s["kind"], s["attrs"]
        self.pools[kind].add(entity_id)
        if kind == "org":
            self.members.setdefault(entity_id, {})
        else:
            self.members[attrs["org"]][entity_id] = None
        for pool, member in (
            ("agent", kind == "user" and attrs["role"] != "customer"),
            ("closed", kind == "ticket" and attrs["status"] == "closed"),
        ):
            if member:
                self.pools[pool].add(entity_id)
            else:
                self.pools[pool].discard(entity_id)

    def upsert(
        self, src: str, entity_id: str, kind: str, name: str, attrs: dict[str, Any]
    ) -> dict[str, Any]:
        self.state[entity_id] = {"kind": kind, "name": name, "attrs": dict(attrs)}
        self._track(entity_id)
        event = {"src": src, "op": "upsert", "id": entity_id, "kind": kind, "name": name}
        return {**event, "attrs": attrs}

    def patch(self, src: str, entity_id: str, **changes: Any) -> dict[str, Any]:
        event: dict[str, Any] = {"src": src, "op": "patch", "id": entity_id}
        name = changes.pop("name", None)
        if name is not None:
            event["name"] = name
        event["attrs"] = changes
        if entity_id in self.state:
            if name is not None:
                self.state[entity_id]["name"] = name
            self.state[entity_id]["attrs"].update(changes)
            self._track(entity_id)
        return event

    def delete(self, src: str, entity_id: str) -> dict[str, Any]:
        s = self.state.pop(entity_id)
        for pool in self.pools.values():
            pool.discard(entity_id)
        if s["kind"] == "org":
            del self.members[entity_id]
        elif s["attrs"]["org"] in self.members:
            del self.members[s["attrs"]["org"]][entity_id]
        if s["kind"] == "ticket":
            self.gone_tickets.append(entity_id)
        return {"src": src, "op": "delete", "id": entity_id}

    # -- what happens ------------------------------------------------------------

    def next_event(self) -> dict[str, Any]:
        if self.queue:
            return self.queue.popleft()
        rng = self.rng
        if len(self.pools["org"]) < 2 or rng.random() < 0.03:
            return self.new_org()
        if len(self.pools["user"]) < 4 or rng.random() < 0.12:
            return self.new_user()
        while True:
            event = rng.choices(self.actions, self.weights)[0]()
            if event is not None:
                return event

    def new_org(self) -> dict[str, Any]:
        base = self.rng.choice(_ORGS)
        slug, n = base.lower(), 2
        while slug in self.slugs:
            slug, n = f"{base.lower()}-{n}", n + 1
        self.slugs.add(slug)
        name = f"{base} {self.rng.choice(_ORG_SUFFIXES)}"
        attrs = {"plan": self.rng.choice(_PLANS), "country": self.rng.choice(_COUNTRIES)}
        return self.upsert("crm", f"org:{slug}", "org", name, attrs)

    def new_user(self) -> dict[str, Any]:
        first, last = self.rng.choice(_FIRST), self.rng.choice(_LAST)
        org = self.pools["org"].choice(self.rng)
        user_id, self.next_user = f"user:{self.next_user}", self.next_user + 1
        attrs = {
            "email": f"{first.lower()}.{last.lower()}@{org.partition(':')[2]}.example",
            "org": org,
            "role": self.rng.choice(_ROLES),
        }
        return self.upsert("crm", user_id, "user", f"{first} {last}", attrs)

    def new_ticket(self) -> dict[str, Any]:
        requester = self.pools["user"].choice(self.rng)
        ticket_id, self.next_ticket = f"ticket:{self.next_ticket}", self.next_ticket + 1
        attrs = {
            "org": self.state[requester]["attrs"]["org"],
            "requester": requester,
            "status": "open",
            "priority": self.rng.choice(_PRIORITIES),
        }
        return self.upsert("helpdesk", ticket_id, "ticket", self.rng.choice(_SUBJECTS), attrs)

    def progress_ticket(self) -> dict[str, Any] | None:
        tickets = self.pools["ticket"]
        if len(tickets) == len(self.pools["closed"]):
            return None
        ticket = tickets.choice(self.rng)
        status = self.state[ticket]["attrs"]["status"]
        if status == "closed":
            return None
        return self.patch("helpdesk", ticket, status=_NEXT_STATUS[status])

    def assign_ticket(self) -> dict[str, Any] | None:
        if not self.pools["ticket"] or not self.pools["agent"]:
            return None
        ticket = self.pools["ticket"].choice(self.rng)
        return self.patch("helpdesk", ticket, assignee=self.pools["agent"].choice(self.rng))

    def presence(self) -> dict[str, Any]:
        user = self.pools["user"].choice(self.rng)
        return self.patch("chat", user, status=self.rng.choice(_PRESENCE))

    def change_user(self) -> dict[str, Any]:
        user = self.pools["user"].choice(self.rng)
        return self.patch("crm", user, role=self.rng.choice(_ROLES))

    def change_org(self) -> dict[str, Any]:
        org = self.pools["org"].choice(self.rng)
        if self.rng.random() < 0.3:
            base = self.state[org]["name"].split()[0]
            return self.patch("crm", org, name=f"{base} {self.rng.choice(_ORG_SUFFIXES)}")
        return self.patch("crm", org, plan=self.rng.choice(_PLANS))

    def redeliver(self) -> dict[str, Any]:
        """A webhook delivered twice: a full upsert of the state as it is."""
        kind = self.rng.choice(["org", "user", "ticket"] if self.pools["ticket"] else ["user"])
        entity_id = self.pools[kind].choice(self.rng)
        s = self.state[entity_id]
        src = "helpdesk" if kind == "ticket" else "crm"
        return self.upsert(src, entity_id, kind, s["name"], dict(s["attrs"]))

    def delete_ticket(self) -> dict[str, Any] | None:
        # Retention deletes closed tickets; spam goes at once.
        pool = self.pools["closed"] if self.pools["closed"] else self.pools["ticket"]
        return self.delete("helpdesk", pool.choice(self.rng)) if pool else None

    def delete_user(self) -> dict[str, Any] | None:
        users = self.pools["user"]
        return self.delete("crm", users.choice(self.rng)) if len(users) > 4 else None

    def delete_org(self) -> dict[str, Any] | None:
        """An org leaves: its users and tickets are deleted in the events after it."""
        if len(self.pools["org"]) < 3:
            return None
        org = self.pools["org"].choice(self.rng)
        for entity_id in list(self.members[org]):
            src = "helpdesk" if entity_id.startswith("ticket:") else "crm"
            self.queue.append(self.delete(src, entity_id))
        return self.delete("crm", org)

    def late_patch(self) -> dict[str, Any] | None:
        """An event about a ticket already deleted: it arrived out of order."""
        if not self.gone_tickets:
            return None
        ticket = self.rng.choice(self.gone_tickets)
        return self.patch("helpdesk", ticket, status="closed")


def generate_events(count: int, *, seed: int = 42) -> Iterator[dict[str, Any]]:
    """``count`` events of a simulated CRM / help-desk / chat stream, the same
    for the same ``count`` and ``seed`` on every run and platform."""
    rng = random.Random(seed)
    world = _World(rng)
    clock = datetime(2024, 3, 4, 9, 0, tzinfo=timezone.utc)
    for _ in range(count):
        clock += timedelta(seconds=rng.randint(1, 90))
        yield {"ts": clock.strftime("%Y-%m-%dT%H:%M:%SZ"), **world.next_event()}


def write_events(path: str | os.PathLike[str], count: int, *, seed: int = 42) -> None:
    """Write :func:`generate_events` as JSONL (``"-"`` for stdout)."""
    lines = (
        json.dumps(event, ensure_ascii=False) + "\n" for event in generate_events(count, seed=seed)
    )
    if os.fspath(path) == "-":
        sys.stdout.writelines(lines)
        return
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
