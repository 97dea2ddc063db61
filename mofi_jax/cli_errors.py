"""One error style for every command: `prog: error: <one line>` and a non-zero exit.

A malformed input file must end a command with a line that names the file and what was
wrong, never with a traceback. Loaders raise their module's ValueError subclass naming
the file and field; these are the exception types an entry point turns into that line.
MemoryError, TypeError and KeyError are here too: a loader that missed a check (an
absurd size, a field of the wrong type) still ends in one line, not a stack.
"""
import sys

INPUT_ERRORS = (OSError, ValueError, MemoryError, TypeError, KeyError)


def input_errors():
  """INPUT_ERRORS, plus TensorFlow's OpError once TensorFlow is loaded (tf.io.gfile's
  errors are not OSErrors). An `except input_errors():` clause is evaluated when an error
  arrives, so commands that never load TensorFlow never import it for this."""
  tf = sys.modules.get('tensorflow')
  errors = getattr(tf, 'errors', None)
  return INPUT_ERRORS + ((errors.OpError,) if errors is not None else ())


def one_line(error):
  """The first non-empty line of `error`'s message, with its type where the message alone
  would not say what went wrong (KeyError 'x', an empty MemoryError)."""
  message = getattr(error, 'message', None) or str(error)
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  text = lines[0] if lines else ''
  if isinstance(error, (OSError, ValueError)) and text:
    return text
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def exit_with(prog, error):
  """Ends the process: `prog: error: <one line>` on stderr, exit status 1."""
  sys.exit(f'{prog}: error: {one_line(error)}')


def run_command(prog, parse_args, run, argv=None):
  """A command's main(): `run(parse_args(argv))`, argv defaulting to the command line; an
  input error ends the process with `exit_with`."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    return run(args)
  except input_errors() as e:
    exit_with(prog, e)
