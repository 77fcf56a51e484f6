"""``mount_each`` of a live-component class: one key never has two live
components at once.  The old component of a key (cancelled by a new value,
a delete, a re-mount of the consumer or its take-over by another
``mount_each``) has ended, its ``finally`` included, before the key's next
component starts, and that one is made with the key's latest value.  A
re-mounted or replacing consumer is the map's consumer at once (never a
second one), for a live-component class as for a function."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import TIMEOUT, Recorder, current_tasks, wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap, TargetBatch

pytestmark = pytest.mark.anyio
_n = itertools.count()


def _name(what: str) -> str:
    return f"turns-{what}-{next(_n)}"


class Keys:
    """What runs for each key: an overlap is a second run of a key while
    one is under way (its ``finally`` included)."""

    def __init__(self) -> None:
        self.active: dict[str, int] = {}
        self.overlaps: list[tuple[str, Any]] = []
        self.starts: list[tuple[str, Any]] = []
        self.closing: list[tuple[str, Any]] = []
        self.ends: list[tuple[str, Any]] = []
        # the finally of a run of these (key, value) waits for the event
        self.gates: dict[tuple[str, Any], anyio.Event] = {}

    def begin(self, key: str, value: Any) -> None:
        self.active[key] = self.active.get(key, 0) + 1
        self.starts.append((key, value))
        if self.active[key] > 1:
            self.overlaps.append((key, value))

    async def end(self, key: str, value: Any, slow: float = 0.0) -> None:
        self.closing.append((key, value))
        with anyio.CancelScope(shield=True):
            if slow:
                await anyio.sleep(slow)
            gate = self.gates.get((key, value))
            if gate is not None:
                with anyio.fail_after(TIMEOUT):
                    await gate.wait()
        self.active[key] -= 1
        self.ends.append((key, value))


class Rows:
    """A KeyedTarget whose sink keeps the rows and every batch."""

    def __init__(self) -> None:
        self.rows: dict[Any, Any] = {}
        self.batches: list[TargetBatch[Any, Any]] = []
        self.target: KeyedTarget[Any, Any] = KeyedTarget(_name("rows"), self._apply)

    def _apply(self, batch: TargetBatch[Any, Any]) -> None:
        self.batches.append(batch)
        for key in batch.deletes:
            del self.rows[key]
        self.rows.update(batch.upserts)

    @property
    def deletes(self) -> list[Any]:
        return [key for batch in self.batches for key in batch.deletes]


def entry_class(keys: Keys, rows: Rows | None = None, *, slow: float = 0.0) -> Any:
    """A live component per entry ``(key, n)``: declares ``key -> n``, marks
    itself ready and waits until cancelled; its ``finally`` takes ``slow``
    seconds (shielded), or waits for the key's gate."""

    class Entry:
        def __init__(self, value: tuple[str, Any]) -> None:
            self.key, self.n = value

        def process(self) -> None:
            if rows is not None:
                rows.target.declare(self.key, self.n)

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            keys.begin(self.key, self.n)
            try:
                await operator.update_full()
                await operator.mark_ready()
                await anyio.sleep_forever()
            finally:
                await keys.end(self.key, self.n, slow)

    return Entry


class Feed:
    """The test's hand into the running app: :meth:`set` changes the state a
    :class:`Producer` declares into its map and waits until it committed."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.send, self.recv = anyio.create_memory_object_stream[None](64)
        self.commits = 0

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.send.close()
        self.recv.close()

    async def push(self) -> None:
        """Re-run the producer, without waiting for its commit."""
        await self.send.send(None)

    async def set(self, **changes: Any) -> None:
        """Change entries (``None``: delete), and wait for the producer's commit."""
        for key, value in changes.items():
            if value is None:
                self.state.pop(key, None)
            else:
                self.state[key] = value
        target = self.commits + 1
        await self.push()
        await wait_for(lambda: self.commits >= target)


class Producer:
    """Declares ``key -> (key, n)`` for each entry of the feed's state, again
    each time the feed is pushed."""

    def __init__(self, feed: Feed, lm: LiveMap[str, tuple[str, Any]]) -> None:
        self.feed = feed
        self.lm = lm

    def process(self) -> None:
        for key, n in self.feed.state.items():
            self.lm.declare_entry(key, (key, n))

    async def process_live(self, operator: coco.LiveComponentOperator) -> None:
        await operator.update_full()
        self.feed.commits += 1
        await operator.mark_ready()
        async for _ in self.feed.recv:
            await operator.update_full()
            self.feed.commits += 1


def _only(exc: BaseException, cls: type[BaseException]) -> bool:
    """Whether ``exc`` is ``cls``, or a group of nothing else."""
    if isinstance(exc, cls):
        return True
    inner = getattr(exc, "exceptions", None)
    return bool(inner) and all(_only(e, cls) for e in inner)


# -- a re-mounted consumer (its parent runs again) ---------------------------------------


class Scene:
    """The parent of a ``mount_each`` over a map runs again on demand; the
    processor is a live-component class or a function."""

    def __init__(self, kind: str, slow_finally: bool) -> None:
        self.kind = kind
        self.keys = Keys()
        self.recorder = Recorder()
        self.slow = 0.02 if slow_finally else 0.0
        self.send, self.recv = anyio.create_memory_object_stream[None](10)

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.send.close()
        self.recv.close()

    def app(self) -> coco.App:
        scene = self
        keys = self.keys

        class Entry:
            def __init__(self, v: str) -> None:
                self.v = v

            def process(self) -> None:
                pass

            async def process_live(self, operator: coco.LiveComponentOperator) -> None:
                keys.begin(self.v, self.v)
                try:
                    await operator.update_full()
                    await operator.mark_ready()
                    await anyio.sleep_forever()
                finally:
                    await keys.end(self.v, self.v, scene.slow)

        @coco.fn
        async def entry_fn(v: str) -> None:
            keys.begin(v, v)
            try:
                await anyio.lowlevel.checkpoint()
            finally:
                await keys.end(v, v, scene.slow)

        proc: Any = Entry if self.kind == "liveclass" else entry_fn

        class Parent:
            def __init__(self, lm: LiveMap[str, str]) -> None:
                self.lm = lm

            async def process(self) -> None:
                await coco.mount_each(proc, self.lm)

            async def process_live(self, operator: coco.LiveComponentOperator) -> None:
                await operator.update_full()
                await operator.mark_ready()
                async for _ in scene.recv:
                    await operator.update_full()

        @coco.fn
        def produce(lm: LiveMap[str, str]) -> None:
            lm.declare_entry("a", "a")

        @coco.fn
        async def main() -> None:
            lm: LiveMap[str, str] = await LiveMap.create()
            await coco.mount(produce, lm)
            await coco.mount(Parent, lm)

        config = coco.AppConfig(_name(self.kind), exception_handler=self.recorder)
        return coco.App(config, main)


@pytest.mark.parametrize("kind", ["liveclass", "fn"])
async def test_a_remounted_consumer_is_not_busy(kind: str) -> None:
    """The parent runs again and mounts the same mount_each: the new mount is
    the map's consumer (no ConsumerBusyError), and the entry runs again."""
    with Scene(kind, slow_finally=False) as scene:
        app = scene.app()
        with anyio.fail_after(TIMEOUT):
            async with app.update(live=True) as h:
                await h.ready()
                await scene.send.send(None)  # the parent runs again: mount_each again
                await wait_for(lambda: len(scene.keys.starts) == 2)
                await anyio.sleep(0.05)
    assert scene.recorder.calls == []
    assert scene.keys.starts == [("a", "a"), ("a", "a")]


@pytest.mark.parametrize("kind", ["liveclass", "fn"])
async def test_a_key_never_runs_twice_at_once_across_a_remount(kind: str) -> None:
    """Re-mounts faster than the old run's (slow, shielded) finally."""
    with Scene(kind, slow_finally=True) as scene:
        app = scene.app()
        with anyio.fail_after(TIMEOUT):
            async with app.update(live=True) as h:
                await h.ready()
                for _ in range(3):
                    await scene.send.send(None)
                    await anyio.sleep(0.005)
                await anyio.sleep(0.3)
    keys = scene.keys
    assert keys.overlaps == [], (keys.starts, scene.recorder.calls)
    assert scene.recorder.calls == []
    assert len(keys.starts) >= 2
    assert len(keys.ends) == len(keys.starts)  # every one ended with the run


async def test_a_static_list_of_live_components_remounted_never_overlaps() -> None:
    """A mount_each of a live class over a plain list, its parent running
    again: the key's next component waits for the old one's finally."""
    keys = Keys()
    send, recv = anyio.create_memory_object_stream[None](8)
    Entry = entry_class(keys, slow=0.02)

    class Parent:
        def __init__(self) -> None:
            self.n = 0

        async def process(self) -> None:
            await coco.mount_each(Entry, [("a", ("a", self.n))])

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update_full()
            await operator.mark_ready()
            async for _ in recv:
                self.n += 1
                await operator.update_full()

    @coco.fn
    async def main() -> None:
        await coco.mount(Parent)

    with send, recv, anyio.fail_after(TIMEOUT):
        async with coco.App(_name("static"), main).update(live=True) as h:
            await h.ready()
            for _ in range(3):
                await send.send(None)
                await anyio.sleep(0.005)
            await wait_for(lambda: keys.starts[-1:] == [("a", 3)])
    assert keys.overlaps == []
    assert keys.starts[0] == ("a", 0) and keys.starts[-1] == ("a", 3)
    assert sorted(keys.ends) == sorted(keys.starts)


# -- a changed value ---------------------------------------------------------------


async def test_a_changed_value_never_overlaps_the_old_component() -> None:
    """The value of "a" changes: its new component starts once the old one's
    finally (slow, shielded) is over."""
    keys = Keys()
    rows = Rows()
    Entry = entry_class(keys, rows, slow=0.02)

    with Feed({"a": 0}) as feed:

        @coco.fn
        async def main() -> None:
            lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
            await coco.mount(Producer, feed, lm)
            await coco.mount_each(Entry, lm)

        with anyio.fail_after(TIMEOUT):
            async with coco.App(_name("change"), main).update(live=True) as h:
                await h.ready()
                await feed.set(a=1)
                await wait_for(lambda: rows.rows == {"a": 1})
    assert keys.overlaps == []
    assert keys.starts == [("a", 0), ("a", 1)]
    assert rows.deletes == []  # a -> 1 is an update, never a delete then an insert


async def test_value_churn_while_the_old_component_winds_down_starts_only_the_latest() -> None:
    """While the old component of "a" is in its finally, the value changes
    twenty times: no component starts before the old one has ended, then
    exactly one, with the latest value (no change lost)."""
    keys = Keys()
    rows = Rows()
    Entry = entry_class(keys, rows)
    gate = keys.gates[("a", 0)] = anyio.Event()

    with Feed({"a": 0, "b": 0}) as feed:

        @coco.fn
        async def main() -> None:
            lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
            await coco.mount(Producer, feed, lm)
            await coco.mount_each(Entry, lm)

        with anyio.fail_after(TIMEOUT):
            async with coco.App(_name("churn"), main).update(live=True) as h:
                await h.ready()
                await feed.set(a=1)
                await wait_for(lambda: ("a", 0) in keys.closing)
                for n in range(2, 21):
                    await feed.set(a=n, b=n)  # "b" is not held back by "a"
                    await anyio.sleep(0)
                await wait_for(lambda: rows.rows.get("b") == 20)
                await anyio.sleep(0.02)
                try:
                    assert [s for s in keys.starts if s[0] == "a"] == [("a", 0)]
                    assert rows.rows["a"] == 0
                finally:
                    gate.set()
                await wait_for(lambda: rows.rows == {"a": 20, "b": 20})
                await anyio.sleep(0.02)
    assert keys.overlaps == []
    assert [s for s in keys.starts if s[0] == "a"] == [("a", 0), ("a", 20)]
    assert rows.deletes == []


@pytest.mark.parametrize("slow", [0.0, 0.003])
async def test_value_churn_faster_than_components_start(slow: float) -> None:
    """Fifty changes of "a" committed back to back, faster than its live
    components get going: never two at once, values only ever newer, and
    the last component has the latest value."""
    keys = Keys()
    rows = Rows()
    Entry = entry_class(keys, rows, slow=slow)

    with Feed({"a": 0}) as feed:

        @coco.fn
        async def main() -> None:
            lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
            await coco.mount(Producer, feed, lm)
            await coco.mount_each(Entry, lm)

        with anyio.fail_after(TIMEOUT):
            async with coco.App(_name("fast"), main).update(live=True) as h:
                await h.ready()
                for n in range(1, 51):
                    feed.state["a"] = n
                    await feed.push()  # no wait for the commit
                await wait_for(lambda: rows.rows == {"a": 50} and keys.active.get("a") == 1)
                await anyio.sleep(0.02)
                assert keys.starts[-1] == ("a", 50)
    assert keys.overlaps == []
    values = [n for _, n in keys.starts]
    assert values == sorted(set(values))  # each value at most once, only ever newer
    assert values[-1] == 50
    assert sorted(keys.ends) == sorted(keys.starts)


async def test_a_key_deleted_and_added_again_waits_for_its_old_component() -> None:
    """The key "a" is deleted while its component runs, then added again
    while the old one is still in its finally: what the old one owned is
    released after its finally, and the new one starts after that, with the
    latest value; a key deleted while its new component waits never starts
    one."""
    keys = Keys()
    rows = Rows()
    Entry = entry_class(keys, rows)
    gate_a = keys.gates[("a", 0)] = anyio.Event()
    gate_b = keys.gates[("b", 0)] = anyio.Event()

    with Feed({"a": 0, "b": 0}) as feed:

        @coco.fn
        async def main() -> None:
            lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
            await coco.mount(Producer, feed, lm)
            await coco.mount_each(Entry, lm)

        with anyio.fail_after(TIMEOUT):
            async with coco.App(_name("readd"), main).update(live=True) as h:
                await h.ready()
                await feed.set(a=None)
                await wait_for(lambda: ("a", 0) in keys.closing)
                await anyio.sleep(0.02)
                held = dict(rows.rows)  # "a" is released once its finally is over
                await feed.set(a=1)
                await feed.set(a=2)
                # "b" changes, then goes while its new component waits
                await feed.set(b=1)
                await wait_for(lambda: ("b", 0) in keys.closing)
                await feed.set(b=None)
                await anyio.sleep(0.02)
                try:
                    assert sorted(keys.starts) == [("a", 0), ("b", 0)]
                finally:
                    gate_a.set()
                    gate_b.set()
                await wait_for(lambda: rows.rows == {"a": 2})
                await anyio.sleep(0.02)
    assert keys.overlaps == []
    assert sorted(keys.starts[:2]) == [("a", 0), ("b", 0)]
    assert keys.starts[2:] == [("a", 2)]
    assert held == {"a": 0, "b": 0}
    # "a"'s row passes from its old component to the new one while the
    # consumer is busy (a transfer: one update, no delete); "b"'s goes
    assert rows.deletes == ["b"]


# -- a take-over by another mount_each -------------------------------------------------


def _consumer_app(
    keys: Keys,
    rows: Rows,
    recorder: Recorder,
    swap: str,
    driver_body: Any,
) -> coco.App:
    """main declares five entries and mounts a Driver, which mounts the
    consumer's host component (``host(lm, n)``) at "consumer" as told by
    ``driver_body(op, lm)``.  The host mounts a mount_each over the map: of
    a live class or a function, at a subpath that depends on ``n`` and
    ``swap``."""
    LiveA = entry_class(keys, rows, slow=0.005)
    LiveB = entry_class(keys, rows, slow=0.005)
    LiveB.__name__ = "LiveB"

    @coco.fn
    async def function(value: tuple[str, int]) -> None:
        key, n = value
        keys.begin(key, n)
        try:
            rows.target.declare(key, n)
            await anyio.sleep(0.001)
        finally:
            await keys.end(key, n, 0.005)

    @coco.fn
    async def host(lm: LiveMap[str, tuple[str, int]], n: int) -> None:
        if swap == "processor":  # another live class: another path
            await coco.mount_each(LiveB if n % 2 else LiveA, lm)
        elif swap == "subpath":
            await coco.mount_each(coco.component_subpath("each", n), LiveA, lm)
        elif swap == "subpath-function":
            await coco.mount_each(coco.component_subpath("each", n), function, lm)
        elif swap == "to-function":  # the same path, the processor's kind changes
            proc: Any = function if n % 2 else LiveA
            await coco.mount_each(coco.component_subpath("each"), proc, lm)
        else:  # from-function
            proc = LiveA if n % 2 else function
            await coco.mount_each(coco.component_subpath("each"), proc, lm)

    class Driver:
        def __init__(self, lm: LiveMap[str, tuple[str, int]]) -> None:
            self.lm = lm

        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.mark_ready()
            await wait_for(lambda: self.lm.stats().entries == 5)
            await driver_body(op, host, self.lm)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        for i in range(5):
            lm.declare_entry(f"k{i}", (f"k{i}", i))
        await coco.mount(Driver, lm)

    return coco.App(coco.AppConfig(_name(f"takeover-{swap}"), exception_handler=recorder), main)


@pytest.mark.parametrize("swap", ["processor", "subpath", "to-function", "from-function"])
async def test_a_live_class_consumer_replaced_by_its_parent_takes_over(swap: str) -> None:
    """The consumer's host runs again and mounts another mount_each over the
    map (another live class, another subpath, or the same path with a
    function instead of a live class or the other way round), while the old
    one's entries run: the new one is the map's consumer (no
    ConsumerBusyError), a key never runs in both, and every row ends up
    declared by the new one without a delete."""
    keys, rows, recorder = Keys(), Rows(), Recorder()
    done = anyio.Event()

    async def body(op: coco.LiveComponentOperator, host: Any, lm: LiveMap[str, Any]) -> None:
        await op.update("consumer", host, lm, 0)
        await wait_for(lambda: len(keys.starts) == 5)
        h = await op.update("consumer", host, lm, 1)  # while the entries run
        with anyio.fail_after(TIMEOUT):
            await h.ready()
            await lm.settle()
            await wait_for(lambda: len(keys.starts) == 10)
        done.set()

    app = _consumer_app(keys, rows, recorder, swap, body)
    async with app.update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await done.wait()
            await anyio.sleep(0.02)
            assert keys.overlaps == []
            await handle.stop()
    assert recorder.calls == []
    assert keys.overlaps == []
    assert rows.rows == {f"k{i}": i for i in range(5)}
    assert rows.deletes == []
    assert sorted(keys.ends) == sorted(keys.starts)


def watching(lm: LiveMap[str, Any]) -> str | None:
    """The path of the mount_each whose consumer is the map's now (also
    while it waits for an earlier one's runs to end)."""
    host = getattr(lm.active_consumer(), "host", None)
    return None if host is None else host.component.path_str


@pytest.mark.parametrize("kind", ["subpath", "subpath-function"])
@pytest.mark.parametrize("how", ["replaced-again", "stopped"])
async def test_a_take_over_cancelled_midway(how: str, kind: str) -> None:
    """The replacing mount_each waits for the old one's entries to wind
    down (their finally held by a gate) and is itself replaced by a third
    one (or the run stops) before they have: the third still waits for the
    first one's entries; nothing is left running, nothing reported.  The
    same for a live-component class and for a function."""
    keys, rows, recorder = Keys(), Rows(), Recorder()
    gates = [keys.gates.setdefault((f"k{i}", i), anyio.Event()) for i in range(5)]
    waiting = anyio.Event()
    maps: list[LiveMap[str, Any]] = []

    async def body(op: coco.LiveComponentOperator, host: Any, lm: LiveMap[str, Any]) -> None:
        await op.update("consumer", host, lm, 0)
        await wait_for(lambda: len(keys.starts) == 5)
        await op.update("consumer", host, lm, 1)
        await wait_for(lambda: len(keys.closing) == 5)  # the take-over waits on them
        maps.append(lm)
        last = 1
        if how == "replaced-again":
            await op.update("consumer", host, lm, 2)
            last = 2
        # the latest mount_each is the map's consumer, waiting for the runs
        await wait_for(lambda: watching(lm) == f"/Driver/'consumer'/'each'/{last}")
        waiting.set()
        await anyio.sleep_forever()

    app = _consumer_app(keys, rows, recorder, kind, body)
    before = current_tasks()
    async with anyio.create_task_group() as tg:
        handle = app.update(live=True)
        tg.start_soon(handle.result)
        with anyio.fail_after(TIMEOUT):
            await waiting.wait()
            assert len(keys.starts) == 5  # nobody started before the old ones ended
            if how == "stopped":
                tg.start_soon(handle.stop)  # stop() waits for their finally
                await wait_for(lambda: maps[0].active_consumer() is None)  # cancelled
                for gate in gates:
                    gate.set()
                await handle.result()
                assert len(keys.starts) == 5  # the waiting one was cancelled
            else:
                for gate in gates:
                    gate.set()
                await wait_for(lambda: len(keys.starts) == 10)
                await anyio.sleep(0.02)
                assert len(keys.starts) == 10  # by the third one only
                await handle.stop()
    assert current_tasks() == before
    assert recorder.calls == []
    assert keys.overlaps == []
    assert sorted(keys.ends) == sorted(keys.starts)
    if how == "replaced-again":
        assert rows.rows == {f"k{i}": i for i in range(5)}


# -- a BaseException from process_live ----------------------------------------------------


class Abort(BaseException):
    """Not an Exception: it ends the app run."""


async def test_a_base_exception_from_process_live_ends_the_run_and_the_next_one_works() -> None:
    """A per-entry live component raises a BaseException (from process_live,
    or from its finally while its successor waits for the key): the run ends
    with it, no task is left, and the next run of the app runs every entry
    again (no key stays held)."""
    keys = Keys()
    rows = Rows()
    state = {"raise": "live"}

    class Entry:
        def __init__(self, value: tuple[str, int]) -> None:
            self.key, self.n = value

        def process(self) -> None:
            rows.target.declare(self.key, self.n)

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            keys.begin(self.key, self.n)
            try:
                await operator.update_full()
                await operator.mark_ready()
                if self.key == "bad" and self.n == 1 and state["raise"] == "live":
                    raise Abort("from process_live")
                await anyio.sleep_forever()
            finally:
                await keys.end(self.key, self.n, 0.002)
                if self.key == "bad" and self.n == 0 and state["raise"] == "finally":
                    raise Abort("from finally")

    with Feed({"a": 0, "bad": 0}) as feed:

        @coco.fn
        async def main() -> None:
            lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
            await coco.mount(Producer, feed, lm)
            await coco.mount_each(Entry, lm)

        app = coco.App(_name("abort"), main)
        for where in ("live", "finally"):
            state["raise"] = where
            feed.state.update(a=0, bad=0)
            keys.starts.clear()
            before = current_tasks()
            with pytest.raises(BaseException) as info:
                with anyio.fail_after(TIMEOUT):
                    async with app.update(live=True) as h:
                        await h.ready()
                        feed.state["bad"] = 1
                        await feed.push()
                        await anyio.sleep_forever()
            assert _only(info.value, Abort), info.value
            assert current_tasks() == before
            assert keys.overlaps == []
            assert all(n == 0 for key, n in keys.starts if key == "a")

        # a clean run: every entry runs again
        state["raise"] = ""
        feed.state.update(a=5, bad=5)
        keys.starts.clear()
        with anyio.fail_after(TIMEOUT):
            await app.update()
    assert sorted(keys.starts) == [("a", 5), ("bad", 5)]
    assert rows.rows == {"a": 5, "bad": 5}
    assert keys.overlaps == []
