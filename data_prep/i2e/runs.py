"""Running a Beam job from an entry point, and ending its client side cleanly.

On a portable runner (Flink, Spark, Dataflow runner v2, the local job service), the
client reads the job's messages on a daemon thread, from a gRPC stream. Beam waits only
10 s for that thread after the job ends. A reader that is still alive when the
interpreter exits can be stopped while it holds its stream's lock, and the stream's
finalizer then waits for that lock forever. A build process that has written all
its output then never exits. `run_to_completion` lets the reader finish, and cancels its
stream if it does not, before the entry point returns.
"""
import faulthandler
import logging
import signal
import threading

# The thread of PipelineResult.wait_until_finish (apache_beam/runners/portability).
MESSAGE_READER = 'wait_until_finish_read'


def run_to_completion(p, reader_wait_s=60.0):
  """Runs pipeline `p`, waits for it and settles its client side. Returns the result.

  `kill -USR1 <pid>` prints every thread's Python stack meanwhile.
  """
  _stacks_on_sigusr1()
  result = p.run()
  result.wait_until_finish()
  settle(result, reader_wait_s)
  return result


def _stacks_on_sigusr1():
  try:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
  except ValueError:  # io.UnsupportedOperation: stderr is no file (an in-process caller)
    pass


def settle(result, reader_wait_s=60.0):
  """Ends what a finished job left running on the client: the message reader thread."""
  readers = [t for t in threading.enumerate() if t.name == MESSAGE_READER]
  for t in readers:
    t.join(reader_wait_s)
  late = [t for t in readers if t.is_alive()]
  stream = getattr(result, '_message_stream', None)
  if late and callable(getattr(stream, 'cancel', None)):
    logging.warning('the job ended but its message stream stayed open for %.0f s; '
                    'cancelling it', reader_wait_s)
    stream.cancel()
    for t in late:
      t.join(reader_wait_s)
  still = [t.name for t in readers if t.is_alive()]
  if still:
    logging.warning('threads of the job client still alive: %s', still)
  return not still
