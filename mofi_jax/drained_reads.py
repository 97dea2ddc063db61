"""Orbax reads that leave nothing running when they fail.

Orbax runs a restore as one coroutine per array shard under `asyncio.gather`,
on a fresh event loop that it closes as soon as `run_until_complete` returns
or raises. When one shard's read fails (a truncated file), gather raises at
once and the loop is closed with the other shards' reads still in flight:
their tasks stay pending, tied to TensorStore futures whose callbacks still
run on TensorStore threads. Python's garbage collector later finalizes those
tasks at an arbitrary point on the main thread, and a finalizer there can
wait on a TensorStore callback that waits for the GIL the collector holds: the
process hangs, and in a multi-process run so does every other process, in
the next collective (seen as a hung 2-process restart, 1 run in 5 under load).

`drained()` makes each event loop created inside it finish every pending task
before it closes, so a failed read returns only once all its reads are done.
"""
import asyncio
import contextlib


class _DrainingLoop(asyncio.SelectorEventLoop):
  """close() first runs every task still pending to its end."""

  def close(self):
    if not self.is_closed() and not self.is_running():
      pending = [t for t in asyncio.all_tasks(self) if not t.done()]
      if pending:
        self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):

  def new_event_loop(self):
    return _DrainingLoop()


@contextlib.contextmanager
def drained():
  """Event loops made in this block (`asyncio.new_event_loop`) drain on close."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)
