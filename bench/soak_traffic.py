"""The soak's traffic: connection plans drawn from a seed, the byte streams both ends send,
and the worker processes that run the clients and the upstream servers on uvloop.

Every connection starts with a header (its id, seed, sizes, kind) from the client, so the
server knows what to send and how to end. Each direction's bytes are cut from one shared
random pool, a block at a seeded offset at a time (never periodic: a lost, repeated or
reordered block changes the digest); each end hashes what it sent and what it received, and
the coordinator compares the two sides' sha256 per connection and direction.

How each kind ends, and what the other end must observe (`EXPECTED_ENDS`):

- clean: both write concurrently, half-close (SHUT_WR) when done, read to the end: EOF, EOF.
- client-first: the server writes only once it has read the client's EOF (data after a half-close).
- server-first: the client writes only once it has read the server's EOF.
- client-reset: the server reads all of the client's bytes, then writes all of its own; the
  client reads them all and resets (SO_LINGER 0). Nothing is in flight, so every byte is known;
  the server must see ECONNRESET, never an EOF.
- server-reset: the client withholds its last byte until it has read all of the server's; the
  server resets once that byte arrives; the client must see ECONNRESET.
- client-abort / server-abort: a reset in mid-stream, after `abort_at` bytes of the aborting
  side's stream, with bytes in flight either way. The other end must see a reset; what it
  received must be a prefix of what was sent (by sha256 of the same prefix); how many bytes
  the relays moved in between is not knowable from the ends, only bounded.
- empty: the client sends nothing and half-closes at once; the server reads EOF with 0 bytes.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import math
import multiprocessing.connection
import os
import random
import socket
import struct
from dataclasses import dataclass, field
from functools import cached_property
from multiprocessing.sharedctypes import RawArray, RawValue
from typing import Any

MiB = 1 << 20
HEADER = struct.Struct("!4sQQQQBBQ")  # magic, conn id, seed, up, down, kind, slow flags, abort_at
MAGIC = b"SOAK"
UP, DOWN = 0, 1
KINDS = ("clean", "client-first", "server-first", "client-reset", "server-reset", "client-abort",
         "server-abort", "empty")
ABORTS = frozenset({"client-abort", "server-abort"})  # bytes in flight at the reset: bounded, not exact
RESETS = frozenset({"client-reset", "server-reset"}) | ABORTS
# kind -> (what the client must observe at the end, what the server must observe)
EXPECTED_ENDS = {kind: ("eof", "eof") for kind in KINDS}
EXPECTED_ENDS.update({"client-reset": ("sent-reset", "reset"), "server-reset": ("reset", "sent-reset"),
                      "client-abort": ("sent-reset", "reset"), "server-abort": ("reset", "sent-reset")})
DEFAULT_MIX = {"clean": 40, "client-first": 12, "server-first": 12, "client-reset": 8, "server-reset": 8,
               "client-abort": 6, "server-abort": 6, "empty": 8}
# Slow-side flags of a plan: which end paces which of its directions.
SLOW_CLIENT_WRITE, SLOW_CLIENT_READ, SLOW_SERVER_WRITE, SLOW_SERVER_READ = 1, 2, 4, 8
SLOW_CHUNK = 16 << 10   # the most a slow side moves per step, then a pause of 1-20 ms
MAX_CHUNK = 1 << 20     # split writes and reads: random sizes from 1 byte to this, log-uniform
# progress counters, one row per worker process (the coordinator samples them)
STARTED, FINISHED, UP_BYTES, DOWN_BYTES, ACTIVE, FAILED = range(6)


# ------------------------------------------------------------------ sizes and plans

@dataclass(frozen=True)
class SizeDistribution:
    """Bytes per direction: 0 with probability `zero`, else a Lomax (Pareto II) draw of tail
    index `alpha` cut at `max_size` (mostly small, a heavy tail), scaled to `mean` overall."""

    mean: float
    max_size: int = 64 * MiB
    alpha: float = 1.1
    zero: float = 0.05

    @property
    def scale(self) -> float:
        """The Lomax scale whose truncated mean, times (1 - zero), is `mean` (bisection)."""
        target = self.mean / (1 - self.zero)
        if not 0 < target < self.max_size:
            raise ValueError(f"a mean of {self.mean:.0f} bytes cannot be drawn below {self.max_size} bytes")
        low, high = 1e-6, float(self.max_size) * 1e6
        for _ in range(200):
            middle = math.sqrt(low * high)
            low, high = (middle, high) if self._truncated_mean(middle) < target else (low, middle)
        return math.sqrt(low * high)

    def _truncated_mean(self, scale: float) -> float:
        # E[min(X, M)] = integral from 0 to M of (1 + x/s)^-alpha dx
        m, a = self.max_size, self.alpha
        if abs(a - 1) < 1e-9:
            return scale * math.log1p(m / scale)
        return scale / (1 - a) * ((1 + m / scale) ** (1 - a) - 1)

    def sampler(self):
        scale, a = self.scale, self.alpha

        def sample(rng: random.Random) -> int:
            if rng.random() < self.zero:
                return 0
            return min(self.max_size, int(scale * ((1 - rng.random()) ** (-1 / a) - 1)))
        return sample


def parse_sizes(text: str, mean: float) -> SizeDistribution:
    """'alpha=1.1,zero=0.05,max=64MiB' (any subset) -> a SizeDistribution of that mean."""
    fields: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key == "max":
            fields["max_size"] = parse_bytes(value)
        elif key in ("alpha", "zero"):
            fields[key] = float(value)
        else:
            raise ValueError(f"--sizes: unknown {key!r} (alpha, zero, max)")
    return SizeDistribution(mean=mean, **fields)


def parse_bytes(text: str) -> int:
    """'64MiB', '512KiB', '5e10', '1000' -> bytes."""
    for suffix, factor in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10), ("GB", 10**9), ("MB", 10**6)):
        if text.endswith(suffix):
            return int(float(text[:-len(suffix)]) * factor)
    return int(float(text))


def parse_mix(text: str) -> dict[str, float]:
    """'clean=40,empty=8,...': weights of the kinds; kinds left out get 0."""
    mix = {}
    for item in filter(None, text.split(",")):
        kind, _, weight = item.partition("=")
        if kind not in KINDS:
            raise ValueError(f"--mix: unknown kind {kind!r} (one of {', '.join(KINDS)})")
        mix[kind] = float(weight)
    if not any(mix.values()):
        raise ValueError("--mix: every weight is 0")
    return mix


@dataclass(frozen=True)
class Plan:
    conn_id: int
    pair: int           # 0: the plaintext pair, 1: the mTLS pair
    kind: str
    seed: int
    up: int             # stream bytes the client sends after its header
    down: int           # stream bytes the server sends
    abort_at: int = 0   # an abort's position in the aborting side's stream
    slow: int = 0       # SLOW_* flags

    @property
    def header(self) -> bytes:
        if self.kind == "empty":
            return b""
        return HEADER.pack(MAGIC, self.conn_id, self.seed, self.up, self.down, KINDS.index(self.kind),
                           self.slow, self.abort_at)

    @property
    def exact(self) -> bool:
        """Whether every byte each way is known from the ends (all but mid-stream aborts)."""
        return self.kind not in ABORTS


@dataclass(frozen=True)
class Traffic:
    """What plans are drawn from: the same in every process, so a conn id names one plan."""

    seed: int
    sizes: SizeDistribution
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    slow_fraction: float = 0.05   # chance of each of the four slow flags
    slow_seconds: float = 2.0     # how long a slow side stays slow on one connection

    @cached_property
    def _sample(self):
        return self.sizes.sampler()

    def plan(self, conn_id: int) -> Plan:
        rng = random.Random(self.seed * 0x9E3779B97F4A7C15 + conn_id)
        sample = self._sample
        kinds = list(self.mix)
        kind = rng.choices(kinds, [self.mix[k] for k in kinds])[0]
        up, down = (0, 0) if kind == "empty" else (sample(rng), sample(rng))
        if kind in ("client-reset", "client-abort"):
            down = max(down, 1)   # the client's cue that the server has its header (and, for a reset, all)
        if kind == "server-reset":
            up = max(up, 1)       # the withheld last byte
        abort_at = rng.randint(0, up) if kind == "client-abort" else rng.randint(0, down) if kind == "server-abort" else 0
        slow = sum(flag for flag in (SLOW_CLIENT_WRITE, SLOW_CLIENT_READ, SLOW_SERVER_WRITE, SLOW_SERVER_READ)
                   if rng.random() < self.slow_fraction)
        return Plan(conn_id, conn_id % 2, kind, rng.getrandbits(63), up, down, abort_at, slow)


# ------------------------------------------------------------------ the byte streams

class Pool:
    """Random bytes that every stream is cut from, a BLOCK at a time at an offset drawn from the
    connection's seed, its direction and the block's index."""

    BLOCK = 256 << 10

    def __init__(self, seed: int, size: int = 32 * MiB + 4099) -> None:
        self.data = memoryview(random.Random(seed).randbytes(size))

    def _offset(self, seed: int, direction: int, block: int) -> int:
        x = (seed ^ (direction << 62) ^ (block * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF   # splitmix64's finaliser
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return (x ^ (x >> 31)) % (len(self.data) - self.BLOCK)

    def piece(self, seed: int, direction: int, position: int, size: int) -> memoryview:
        """Up to `size` bytes of the stream from `position`, within one block."""
        block, within = divmod(position, self.BLOCK)
        start = self._offset(seed, direction, block) + within
        return self.data[start:start + min(size, self.BLOCK - within)]

    def digest(self, seed: int, direction: int, length: int, header: bytes = b"") -> bytes:
        """sha256 of the header then the stream's first `length` bytes: what a prefix must hash to."""
        digest = hashlib.sha256(header)
        position = 0
        while position < length:
            piece = self.piece(seed, direction, position, length - position)
            digest.update(piece)
            position += len(piece)
        return digest.digest()


# ------------------------------------------------------------------ one end of a connection

RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE})


async def fd_ready(add, remove, fd: int) -> None:
    """Wait until `fd` is ready: `add`/`remove` are the loop's add_reader/remove_reader (or _writer)."""
    future = asyncio.get_running_loop().create_future()
    add(fd, lambda: future.done() or future.set_result(None))
    try:
        await future
    finally:
        remove(fd)


class Reset(Exception):
    """The peer reset the connection (ECONNRESET or EPIPE)."""


class End:
    """One socket end: split, optionally slow writes and reads, each counted and hashed."""

    def __init__(self, sock: socket.socket, rng: random.Random, slow_write: bool, slow_read: bool,
                 slow_until: float, progress: Any = None) -> None:
        self.sock, self.fd, self.rng = sock, sock.fileno(), rng
        self.loop = asyncio.get_running_loop()
        self.slow_write, self.slow_read, self.slow_until = slow_write, slow_read, slow_until
        self.progress = progress   # (counters, sent index, received index) for a client end
        self.sent = self.received = 0
        self.sent_digest, self.received_digest = hashlib.sha256(), hashlib.sha256()
        self.saw_reset = False

    # One receive buffer for every end of the process: each recv is hashed before the next await.
    buffer = bytearray(MAX_CHUNK)

    async def _ready(self, add, remove) -> None:
        await fd_ready(add, remove, self.fd)

    def _chunk(self, slow: bool, limit: int) -> int:
        size = int(math.exp(self.rng.uniform(0, math.log(MAX_CHUNK))))
        if slow and self.loop.time() < self.slow_until:
            size = min(size, SLOW_CHUNK)
        return max(1, min(size, limit))

    async def _pause(self, slow: bool) -> None:
        if slow and self.loop.time() < self.slow_until:
            await asyncio.sleep(self.rng.uniform(0.001, 0.02))

    async def write(self, data: memoryview | bytes) -> None:
        """Write all of `data` in random pieces; raise Reset when the peer reset."""
        view = memoryview(data)
        while view:
            piece = view[:self._chunk(self.slow_write, len(view))]
            try:
                written = self.sock.send(piece)
            except BlockingIOError:
                await self._ready(self.loop.add_writer, self.loop.remove_writer)
                continue
            except OSError as error:
                if error.errno in RESET_ERRNOS:
                    self.saw_reset = True
                    raise Reset from error
                raise
            self.sent_digest.update(piece[:written])
            self.sent += written
            if self.progress:
                self.progress[0][self.progress[1]] += written
            view = view[written:]
            await self._pause(self.slow_write)

    async def write_stream(self, pool: Pool, seed: int, direction: int, start: int, stop: int) -> None:
        position = start
        while position < stop:
            piece = pool.piece(seed, direction, position, stop - position)
            await self.write(piece)
            position += len(piece)

    async def _recv(self, size: int) -> int:
        """One recv of at most `size` bytes into the shared buffer, hashed and counted; 0 at EOF."""
        while True:
            try:
                count = self.sock.recv_into(self.buffer, size)
                break
            except BlockingIOError:
                await self._ready(self.loop.add_reader, self.loop.remove_reader)
            except OSError as error:
                if error.errno in RESET_ERRNOS:
                    self.saw_reset = True
                    raise Reset from error
                raise
        if count:
            self.received_digest.update(memoryview(self.buffer)[:count])
            self.received += count
            if self.progress:
                self.progress[0][self.progress[2]] += count
        return count

    async def read(self, limit: int | None = None) -> bytes | None:
        """Read until EOF (return None) or `limit` bytes in all (return b''); raise Reset.
        With `limit`, never reads past it."""
        while limit is None or self.received < limit:
            if not await self._recv(self._chunk(self.slow_read, MAX_CHUNK if limit is None else limit - self.received)):
                return None
            await self._pause(self.slow_read)
        return b""

    async def read_exact(self, size: int) -> bytes | None:
        """The next `size` bytes (hashed and counted, in random pieces), or None at an EOF before them."""
        data = bytearray()
        while len(data) < size:
            count = await self._recv(self._chunk(False, size - len(data)))
            if not count:
                return None
            data += self.buffer[:count]
        return bytes(data)

    def half_close(self) -> None:
        """SHUT_WR; raise Reset when the peer has reset already (the socket is then closed: ENOTCONN)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as error:
            if error.errno in RESET_ERRNOS | {errno.ENOTCONN}:
                self.saw_reset = True
                raise Reset from error
            raise

    def reset(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def result(self) -> tuple:
        return self.sent, self.sent_digest.digest(), self.received, self.received_digest.digest()


async def until_reset_or_end(end: End) -> str:
    """Read everything left; 'reset' or 'eof'."""
    try:
        await end.read()
    except Reset:
        return "reset"
    return "reset" if end.saw_reset else "eof"


async def both(*coroutines) -> list:
    """Run concurrently; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        await cancelled(*tasks)


async def cancelled(*tasks) -> None:
    """Cancel and wait for them: a task waiting on a socket must let go of its fd before it is
    closed (uvloop aborts on a poll handle of a closed fd)."""
    tasks = [task for task in tasks if task is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------ the client and server scripts

async def through_a_reset(end: End, send) -> str:
    """When the other side aborts: `send()` (cut short by the reset) while reading to the end;
    'reset' if either saw it (after a send took the reset, a read may find only the end)."""
    async def send_until_reset():
        try:
            await send()
        except Reset:
            pass
    _, ended = await both(send_until_reset(), until_reset_or_end(end))
    return "reset" if end.saw_reset else ended


async def client_script(end: End, plan: Plan, pool: Pool) -> str:
    """Play the client's side of `plan`; return how the connection ended for it."""
    header, seed, kind = plan.header, plan.seed, plan.kind

    async def send_all_then_half_close():
        await end.write(header)
        await end.write_stream(pool, seed, UP, 0, plan.up)
        end.half_close()

    if kind == "empty":
        end.half_close()
        return await until_reset_or_end(end)
    if kind in ("clean", "client-first"):
        _, ended = await both(send_all_then_half_close(), until_reset_or_end(end))
        return ended
    if kind == "server-first":
        await end.write(header)
        ended = await until_reset_or_end(end)
        await end.write_stream(pool, seed, UP, 0, plan.up)
        end.half_close()
        return ended
    if kind == "client-reset":
        async def send_all():
            await end.write(header)
            await end.write_stream(pool, seed, UP, 0, plan.up)
        _, got = await both(send_all(), end.read(plan.down))
        if got is None:
            return "eof"        # the server's bytes ended early: not what the plan says
        end.reset()
        return "sent-reset"
    if kind == "server-reset":
        async def send_all_but_one():
            await end.write(header)
            await end.write_stream(pool, seed, UP, 0, plan.up - 1)
        _, got = await both(send_all_but_one(), end.read(plan.down))
        if got is None:
            return "eof"
        await end.write_stream(pool, seed, UP, plan.up - 1, plan.up)
        return await until_reset_or_end(end)
    if kind == "client-abort":
        first_byte = asyncio.ensure_future(end.read(1))
        reader = None
        try:
            await end.write(header)
            await end.write_stream(pool, seed, UP, 0, plan.abort_at)
            await first_byte            # the server has read the header: it knows this connection
            reader = asyncio.ensure_future(until_reset_or_end(end))
            await asyncio.sleep(0)      # let it read what has come, then reset in mid-stream
        finally:
            await cancelled(first_byte, reader)
        end.reset()
        return "sent-reset"
    if kind == "server-abort":
        return await through_a_reset(end, send_all_then_half_close)
    raise ValueError(kind)


async def server_script(end: End, plan: Plan, pool: Pool) -> str:
    """Play the server's side of `plan` (its header already read); how it ended for the server."""
    seed, kind = plan.seed, plan.kind

    async def send_all_then_half_close():
        await end.write_stream(pool, seed, DOWN, 0, plan.down)
        end.half_close()

    if kind == "clean":
        _, ended = await both(send_all_then_half_close(), until_reset_or_end(end))
        return ended
    if kind == "client-first":
        ended = await until_reset_or_end(end)
        await send_all_then_half_close()
        return ended
    if kind == "server-first":
        await send_all_then_half_close()
        return await until_reset_or_end(end)
    up_total = HEADER.size + plan.up
    if kind == "client-reset":
        if await end.read(up_total) is None:
            return "eof"
        await end.write_stream(pool, seed, DOWN, 0, plan.down)
        return await until_reset_or_end(end)
    if kind == "server-reset":
        if await end.read(up_total - 1) is None:
            return "eof"
        await end.write_stream(pool, seed, DOWN, 0, plan.down)
        if await end.read(up_total) is None:
            return "eof"
        end.reset()
        return "sent-reset"
    if kind == "client-abort":
        return await through_a_reset(end, send_all_then_half_close)
    if kind == "server-abort":
        reader = asyncio.ensure_future(until_reset_or_end(end))
        try:
            await end.write_stream(pool, seed, DOWN, 0, plan.abort_at)
            await asyncio.sleep(0)
        finally:
            await cancelled(reader)
        end.reset()
        return "sent-reset"
    raise ValueError(kind)


# ------------------------------------------------------------------ records

@dataclass(frozen=True)
class ClientRecord:
    conn_id: int
    end: str            # what the client observed ('eof', 'reset', 'sent-reset'), or '' on a failure
    error: str          # a failure's kind ('' when none): connect, timeout, reset, ...
    sent: int
    sent_digest: bytes
    received: int
    received_digest: bytes
    received_ok: bytes  # sha256 of the down stream's first `received` bytes (aborts only, else b'')


@dataclass(frozen=True)
class ServerRecord:
    conn_id: int | None   # None: a connection that sent no header (empty), or a header cut short
    end: str
    error: str
    sent: int
    sent_digest: bytes
    received: int
    received_digest: bytes
    received_ok: bytes    # sha256 of the client's header and up stream's first bytes (aborts only)


def failure(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "timeout"
    if isinstance(error, Reset):
        return "unexpected-reset"
    if isinstance(error, OSError):
        return errno.errorcode.get(error.errno or 0, type(error).__name__)
    return type(error).__name__


# ------------------------------------------------------------------ a worker process

@dataclass(frozen=True)
class Job:
    """One phase for one worker: which conn ids it opens, and where they go."""

    first_id: int
    count: int                  # conn ids first_id .. first_id + count - 1, over all workers
    targets: tuple              # (host, port) of each pair's outbound sidecar, by Plan.pair
    concurrency: int            # this worker's client tasks
    timeout: float              # a connection that takes longer is a failure ("timeout")


class Worker:
    """A process's clients (its share of a Job's conn ids) and an upstream server (on an
    inherited listening socket) that serves whichever connections the sidecars hand it."""

    def __init__(self, index: int, workers: int, traffic: Traffic, pool: Pool, job: Job,
                 listener: socket.socket, counters: Any, stop: Any) -> None:
        self.index, self.workers, self.traffic, self.pool, self.job = index, workers, traffic, pool, job
        self.listener, self.counters, self.stop = listener, counters, stop
        self.clients: list[ClientRecord] = []
        self.servers: list[ServerRecord] = []
        self.serving: set[asyncio.Task] = set()

    def _end(self, sock: socket.socket, seed: int, slow_write: bool, slow_read: bool, client: bool) -> End:
        loop = asyncio.get_running_loop()
        progress = (self.counters, UP_BYTES, DOWN_BYTES) if client else None
        return End(sock, random.Random(seed ^ client), slow_write, slow_read,
                   loop.time() + self.traffic.slow_seconds, progress)

    async def _connect(self, end: End, target: tuple) -> None:
        if end.sock.connect_ex(target) not in (0, errno.EINPROGRESS):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "connect")
        await end._ready(end.loop.add_writer, end.loop.remove_writer)
        status = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if status:
            raise OSError(status, "connect")

    async def _client(self, plan: Plan) -> ClientRecord:
        sock = socket.socket()
        sock.setblocking(False)
        end = self._end(sock, plan.seed, bool(plan.slow & SLOW_CLIENT_WRITE), bool(plan.slow & SLOW_CLIENT_READ),
                        True)
        ended, error, connected = "", "", False
        try:
            async with asyncio.timeout(self.job.timeout):
                await self._connect(end, self.job.targets[plan.pair])
                connected = True
                ended = await client_script(end, plan, self.pool)
        except Exception as exc:  # noqa: BLE001 (every failure is recorded, by kind)
            error = failure(exc) if connected else "connect-" + failure(exc)
        finally:
            if sock.fileno() >= 0:
                end.reset() if error else sock.close()
        received_ok = self.pool.digest(plan.seed, DOWN, end.received) if plan.kind in ABORTS else b""
        return ClientRecord(plan.conn_id, ended, error, *end.result(), received_ok)

    async def _clients(self) -> None:
        ids = iter(range(self.job.first_id + self.index, self.job.first_id + self.job.count, self.workers))

        async def one_after_another():
            for conn_id in ids:
                if self.stop.value:
                    return
                plan = self.traffic.plan(conn_id)
                self.counters[STARTED] += 1
                self.counters[ACTIVE] += 1
                record = await self._client(plan)
                self.counters[ACTIVE] -= 1
                self.counters[FINISHED] += 1
                self.counters[FAILED] += bool(record.error)
                self.clients.append(record)

        await asyncio.gather(*(one_after_another() for _ in range(self.job.concurrency)))

    async def _serve(self, sock: socket.socket) -> None:
        end = self._end(sock, 0, False, False, False)
        conn_id, ended, error, plan = None, "", "", None
        try:
            async with asyncio.timeout(self.job.timeout):
                header = await end.read_exact(HEADER.size)
                if header is None:   # an empty connection, or a header cut short
                    ended, error = ("eof", "") if end.received == 0 else ("", "header-cut")
                    if not error:
                        end.half_close()
                else:
                    magic, conn_id, *_ = HEADER.unpack(header)
                    plan = self.traffic.plan(conn_id) if magic == MAGIC else None
                    if plan is None or plan.header != header:
                        raise ValueError("bad header")
                    end.rng = random.Random(plan.seed)
                    end.slow_write = bool(plan.slow & SLOW_SERVER_WRITE)
                    end.slow_read = bool(plan.slow & SLOW_SERVER_READ)
                    ended = await server_script(end, plan, self.pool)
        except asyncio.CancelledError:
            error = "stuck"   # still open when the run drained
        except Exception as exc:  # noqa: BLE001
            error = failure(exc)
        finally:
            if sock.fileno() >= 0:
                end.reset() if error else sock.close()
        received_ok = b""
        if plan is not None and plan.kind in ABORTS:
            received_ok = self.pool.digest(plan.seed, UP, end.received - HEADER.size, plan.header)
        self.servers.append(ServerRecord(conn_id, ended, error, *end.result(), received_ok))

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        self.listener.setblocking(False)
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                await fd_ready(loop.add_reader, loop.remove_reader, self.listener.fileno())
                continue
            sock.setblocking(False)
            task = asyncio.ensure_future(self._serve(sock))
            self.serving.add(task)
            task.add_done_callback(self.serving.discard)

    async def run(self, commands: multiprocessing.connection.Connection) -> None:
        """Open this worker's connections; say so; serve until told to drain; send the records."""
        loop = asyncio.get_running_loop()
        acceptor = asyncio.ensure_future(self._accept())
        await self._clients()
        commands.send("clients-done")
        await fd_ready(loop.add_reader, loop.remove_reader, commands.fileno())
        os.set_blocking(commands.fileno(), True)   # the loop made it non-blocking; the records are large
        commands.recv()   # "drain": every client of every worker is done
        acceptor.cancel()
        if self.serving:
            _, stuck = await asyncio.wait(set(self.serving), timeout=self.job.timeout)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck)
        commands.send((self.clients, self.servers))


def worker_main(index: int, workers: int, traffic: Traffic, pool: Pool, job: Job, listener: socket.socket,
                counters: Any, stop: Any, commands: multiprocessing.connection.Connection) -> None:
    """A worker process's entry (forked: the pool and the listening socket are inherited)."""
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(Worker(index, workers, traffic, pool, job, listener, counters, stop).run(commands))


def progress_counters() -> Any:
    """One worker's progress (STARTED ... FAILED), in shared memory: it writes, the coordinator reads."""
    return RawArray("q", 6)


def stop_flag() -> Any:
    """Set by the coordinator at --duration: the workers open no more connections."""
    return RawValue("b", 0)
