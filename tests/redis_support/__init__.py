"""A real ``redis-server`` for the Redis tests, and processes running the
producers and consumers of tests/redis_support/worker.py.

The server listens on 127.0.0.1 on a free port, keeps its files in a
temporary directory and saves nothing (``--save '' --appendonly no``).  When
``redis-server`` is not on PATH the tests that need it skip, saying so,
unless ``LIVEMAP_REQUIRE_REDIS=1`` is set: then they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

WORKER = str(Path(__file__).with_name("worker.py"))
TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        why = "redis-server is not on PATH (install it, e.g. apt-get install redis-server)"
        if os.environ.get("LIVEMAP_REQUIRE_REDIS") == "1":
            pytest.fail(f"LIVEMAP_REQUIRE_REDIS=1 but {why}")
        pytest.skip(why)
    return path


class RedisServer:
    """One ``redis-server`` process: start, stop, restart, pause, resume.
    ``options``: more command-line options for the server."""

    def __init__(self, directory: Path, *options: str) -> None:
        self.binary = require_server()
        self.directory = directory
        self.options = options
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--protected-mode",
                "no",
                # small stream nodes: MAXLEN ~ trims close to its length
                "--stream-node-max-entries",
                "10",
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def cpu_seconds(self) -> float:
        """The CPU time the server has used (user and system, from /proc;
        0.0 where there is no /proc)."""
        assert self.proc is not None
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server for the whole session (tests keep apart by map name)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for the tests that restart or pause it."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Worker:
    """A worker process, talked to by lines."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        self.proc = proc
        assert proc.stdout is not None
        self._buffer = b""

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send((line + "\n").encode())

    async def read_line(self, timeout: float = TIMEOUT) -> str:
        assert self.proc.stdout is not None
        with anyio.fail_after(timeout):
            while b"\n" not in self._buffer:
                chunk = await self.proc.stdout.receive()
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def declare(self, entries: dict[str, Any]) -> list[str]:
        """(producer) Declare ``entries`` in one update; the errors reported."""
        await self.send(json.dumps(entries))
        reply = json.loads(await self.read_line())
        assert reply["ok"]
        return list(reply["errors"])

    async def update(self, parts: dict[str, Any]) -> dict[str, Any]:
        """(producer of parts) Declare ``parts``; the reply (see worker.py)."""
        await self.send(json.dumps(parts))
        reply: dict[str, Any] = json.loads(await self.read_line())
        return reply

    async def settle(self) -> int:
        """(consumer) Settle the view; its number of resyncs."""
        await self.send("settle")
        line = await self.read_line()
        assert line.startswith("settled "), line
        return int(line.split()[1])

    def kill(self) -> None:
        self.proc.kill()

    async def close(self) -> None:
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                await self.proc.stdin.aclose()
            with anyio.move_on_after(10):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self.proc.wait()


async def start_worker(*args: str) -> Worker:
    proc = await anyio.open_process(
        [sys.executable, WORKER, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return Worker(proc)


async def start_producer(url: str, name: str, app: str, backend: str, shards: int = 1) -> Worker:
    return await start_worker("produce", url, name, app, backend, str(shards))


async def start_parts(
    url: str, name: str, app: str, backend: str, mode: str = "live", lease_ttl: float = 1.0
) -> Worker:
    """A producer of parts (see worker.py ``parts``)."""
    return await start_worker("parts", url, name, app, backend, mode, str(lease_ttl))


async def start_consumer(
    url: str, name: str, backend: str, log: Path, shards: list[int] | None = None
) -> Worker:
    args = ["consume", url, name, backend, str(log)]
    if shards is not None:
        args.append(",".join(map(str, shards)))
    worker = await start_worker(*args)
    line = await worker.read_line()
    assert line == "ready", line
    return worker


def read_log(log: Path) -> tuple[dict[str, Any], list[list[Any]], list[list[Any]]]:
    """What a consumer's log says: the entries it holds (its target's rows),
    its processor calls, and the calls that repeated the value the key's
    previous call had (with no delete in between)."""
    rows: dict[str, Any] = {}
    calls: list[list[Any]] = []
    repeats: list[list[Any]] = []
    last: dict[str, Any] = {}
    if not log.exists():
        return rows, calls, repeats
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry[0] == "u":
            rows[entry[1]] = entry[2]
        elif entry[0] == "d":
            rows.pop(entry[1], None)
            last.pop(entry[1], None)
        else:
            calls.append(entry)
            if last.get(entry[1]) == entry[2]:
                repeats.append(entry)
            last[entry[1]] = entry[2]
    return rows, calls, repeats


class Producer:
    """A live app whose component declares ``state`` into a RedisLiveMap made
    once (``async with Producer(...) as p: await p.commit({...})``).  The map
    is made by the root; the declaring component is the live component at
    ``/declare``; what goes to its handler chain lands in ``errors``."""

    def __init__(self, client: Any, name: str, app: str = "producer", **options: Any) -> None:
        import livemap as coco
        from livemap.redis import RedisLiveMap

        self.state: dict[Any, Any] = {}
        self.errors: list[BaseException] = []
        self.map: Any = None
        self._send: Any = None
        self._receive: Any = None
        producer = self

        class Declare:
            def process(self) -> None:
                for key, value in producer.state.items():
                    producer.map.declare_entry(key, value)

            async def process_live(self, operator: coco.LiveComponentOperator) -> None:
                # no run before the first commit: a restarted producer's first
                # commit is what it declares (an empty one would delete all)
                await operator.mark_ready()
                async for done in producer._receive:
                    await operator.update_full()
                    done.set()

        async def main() -> None:
            self.map = await RedisLiveMap.create(client, name, **options)
            await coco.mount(coco.component_subpath("declare"), Declare)

        def handler(exc: BaseException, ctx: coco.ExceptionContext) -> None:
            self.errors.append(exc)

        self.app = coco.App(coco.AppConfig(app, exception_handler=handler), main)
        self._handle: Any = None

    async def __aenter__(self) -> Producer:
        self._send, self._receive = anyio.create_memory_object_stream[anyio.Event](10)
        self._handle = self.app.update(live=True)
        await self._handle.__aenter__()
        with anyio.fail_after(TIMEOUT):
            await self._handle.ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._send.close()
        try:
            await self._handle.__aexit__(*exc)
        finally:
            self._receive.close()

    async def commit(self, state: dict[Any, Any]) -> None:
        self.state = dict(state)
        done = anyio.Event()
        with anyio.fail_after(TIMEOUT):
            await self._send.send(done)
            await done.wait()
