"""Auto-pipelining: the script calls in flight at the same time share round trips to Redis (as ioredis and
Lettuce do), since Redis spends about as much per round trip (a read, a reply write) as on a metering script.

Each call queues its command with a future; once per event-loop iteration the queue leaves as one batch: its
commands in one write on one pooled connection, the replies read in order, each handed to its caller's future.
Several batches may be on the wire at once, at most `max_batches` (the pool's size); calls queued while every
connection carries a batch leave together when one comes back.

What a caller sees is what one call on a connection of its own would give it:
- a reply that is an error (a script error, NOSCRIPT, a wrong type) fails that call only: the reply was read
  whole, so the connection stays in step;
- a connection error fails every call of the batch still waiting, and redis-py drops the connection;
- a call once made is sent, as redis-py sends a call before its caller can go: a caller that stops waiting
  (its deadline passed, its client hung up) leaves its command in the batch and the others' replies alone: the
  batch still reads its reply and drops it. Once every caller of a written batch has stopped waiting, the batch
  is cancelled, which closes its connection (redis-py closes a connection interrupted mid-read), so a
  connection never goes back to the pool with replies unread.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, NoScriptError, ResponseError
from redis.typing import EncodableT, KeyT
from redis.utils import HIREDIS_AVAILABLE

if HIREDIS_AVAILABLE:
    import hiredis

Command = tuple[EncodableT, ...]


class _Batch:
    """The calls that leave in one write; cancels its task once none of their callers waits for a reply."""

    __slots__ = ("commands", "futures", "task", "reading", "waiting")

    def __init__(self, commands: list[Command], futures: list[asyncio.Future[Any]]) -> None:
        self.commands = commands
        self.futures = futures
        self.task: asyncio.Task[None] | None = None
        self.reading = False  # from the write until every reply is read
        self.waiting = len(futures)
        for future in futures:
            future.add_done_callback(self._answered)

    def _answered(self, future: asyncio.Future[Any]) -> None:
        self.waiting -= 1
        if self.waiting == 0 and self.reading and self.task is not None:
            self.task.cancel()  # every caller gave up (deadline or hang-up): drop the connection, not the pool

    def fail(self, exc: BaseException) -> None:
        for future in self.futures:
            if not future.done():
                future.set_exception(exc)


class AutoPipeline:
    """Sends the EVALSHA calls of one Redis client (one server, or the primary a Sentinel names) in batches."""

    def __init__(self, client: aioredis.Redis, max_batches: int) -> None:
        self._pool = client.connection_pool
        self._max_batches = max_batches
        self._commands: list[Command] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._flush_due = False
        self._batches: set[asyncio.Task[None]] = set()
        self.calls = 0  # commands sent ...
        self.round_trips = 0  # ... in this many writes (benchmarks and tests read both)

    async def evalsha(self, script: AsyncScript, keys: Sequence[KeyT], args: Sequence[EncodableT]) -> Any:
        """What `script(keys, args)` answers; on NOSCRIPT (Redis restarted or flushed) it loads the script first,
        in a batch too: the callers of a batch that all met NOSCRIPT need no connection each."""
        try:
            return await self._queue(("EVALSHA", script.sha, len(keys), *keys, *args))
        except NoScriptError:
            await self._queue(("SCRIPT", "LOAD", script.script))  # its SHA1 is script.sha
            return await self._queue(("EVALSHA", script.sha, len(keys), *keys, *args))

    async def close(self) -> None:
        for task in list(self._batches):
            task.cancel()
        await asyncio.gather(*self._batches, return_exceptions=True)

    def _queue(self, command: Command) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._commands.append(command)
        self._futures.append(future)
        if not self._flush_due:
            self._flush_due = True
            loop.call_soon(self._flush)  # after the callbacks of this iteration, which may queue more
        return future

    def _flush(self) -> None:
        self._flush_due = False
        if len(self._batches) >= self._max_batches:
            return  # every connection carries a batch: the queue leaves when one comes back
        if not self._commands:
            return
        batch = _Batch(self._commands, self._futures)
        self._commands, self._futures = [], []
        batch.task = task = asyncio.get_running_loop().create_task(self._send(batch))
        self._batches.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        if self._futures and not self._flush_due:
            self._flush()

    async def _send(self, batch: _Batch) -> None:
        connection = None
        try:
            connection = await self._pool.get_connection()
            await connection.send_packed_command(packed(connection, batch.commands), check_health=False)
            self.calls += len(batch.commands)
            self.round_trips += 1
            if batch.waiting == 0:  # every caller went before the write ended: no reply is wanted
                await connection.disconnect()
                return
            batch.reading = True
            for future in batch.futures:
                try:
                    reply = await connection.read_response()
                except ResponseError as exc:  # this call's own error, read whole
                    if not future.done():
                        future.set_exception(exc)
                else:
                    if not future.done():
                        future.set_result(reply)
            batch.reading = False
        except Exception as exc:  # no connection, or it failed: redis-py has closed it
            batch.fail(exc)
        except asyncio.CancelledError:  # every caller gave up, or the store is closing
            batch.fail(ConnectionError("the store is closing"))
            raise
        finally:
            if connection is not None:
                await self._pool.release(connection)


def packed(connection: AbstractConnection, commands: list[Command]) -> list[bytes]:
    """The batch in the Redis protocol: by hiredis's C packer when it is installed (redis-py's sync client packs
    with it too; its asyncio client packs in Python, ~10x slower for a script call's 30-odd arguments), else by
    the connection's own packer. Both give the same bytes for the str, int and bytes arguments the store sends."""
    if HIREDIS_AVAILABLE:
        return [hiredis.pack_command(command) for command in commands]
    return connection.pack_commands(commands)
