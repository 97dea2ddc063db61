"""What a checkpoint must pass before training continues from it.

* Integrity: a 64-bit checksum of every array, saved in the checkpoint's
  metadata and verified after each restore. Per element i (row-major global
  index) with 32-bit word x_i, two lanes k = 0, 1 sum

      c_k = sum_i  (fmix32(i + s_k) | 1) * fmix32(x_i ^ s_k)   mod 2**32

  (fmix32: MurmurHash3's bijective finaliser; s_k: fixed seeds). The weight is
  odd, hence invertible mod 2**32, and fmix32 is a bijection, so changing any
  one word (any bit flip) always changes both lanes; other damage goes unseen
  with probability ~2**-64. The sum is elementwise work plus a reduction, so
  under `jax.jit` each device hashes only the shard it holds and the partial
  sums meet in one small all-reduce: the cost per host stays proportional at
  pod scale, and the value does not depend on the mesh that saved or restored.
* Compatibility: the saved tree (paths, shapes, dtypes) and the model-defining
  config keys must equal the run's. A mismatch is the user's choice of
  config, not damage, so the checkpoint is refused and left alone.
* Classification of restore errors: corrupt (quarantine, fall back), transient
  (retry, then fail), fatal (fail; never quarantine).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

SEEDS = (0x9E3779B9, 0x7F4A7C15)
# Config keys under `model` that change how a step runs (or only how the
# parameters were first drawn), not what they mean: a resume may change them.
EXECUTION_ONLY_KEYS = ('model.remat', 'model.dtype', 'model.logit_scale_init',
                      'model.head.bias_init', 'model.head.scale_init')


# Input keys that do not change the tf.data graph, so the saved input position
# still fits. Any other `input.` key does: restoring a symbolic iterator state
# into another graph can crash TensorFlow (heap corruption, measured with a
# changed shuffle_buffer), so it is refused before the restore.
# The corpus recipe is free too: what it built is compared by the corpus's fingerprint.
INPUT_FREE_KEYS = ('input.threads', 'input.prefetch_batches', 'input.data_dir',
                   'input.recipe', 'input.max_bad_record_rate')
INPUT_FREE_PREFIXES = ('input.recipe_args.',)


class CheckpointError(RuntimeError):
  """Base of the errors a restore raises to the user."""


class IncompatibleCheckpointError(CheckpointError):
  pass


class NothingToResumeError(CheckpointError):
  """Every checkpoint failed its checks and was moved aside."""


class CorruptCheckpointError(CheckpointError):
  pass


class TransientCheckpointError(CheckpointError):
  pass


class FatalCheckpointError(CheckpointError):
  pass


# ---------------------------------------------------------------- checksums

def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x):
  """The array as uint32 words with the array's own shape (+ [2] for 64-bit)."""
  size = jnp.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape):
  """uint32 row-major global index of every element, built from iotas so that
  it is sharded like the array it indexes (no reshape, no gather)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(
        stride % 2**32)
    stride *= shape[dim]
  return index


def _leaf_checksum(x):
  words = _words(x)
  index = _flat_index(words.shape)
  lanes = []
  for seed in SEEDS:
    seed = jnp.uint32(seed)
    weight = _fmix32(index + seed) | jnp.uint32(1)
    lanes.append(jnp.sum(weight * _fmix32(words ^ seed), dtype=jnp.uint32))
  return jnp.stack(lanes)


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def leaf_paths(tree):
  """{'params.image_tower.embed.kernel': leaf} in a form shared by a live
  tree and the metadata tree Orbax returns for it."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator='.'): leaf
          for path, leaf in flat}


def checksums(tree):
  """{leaf path: 16 hex digits}. Blocks until the tree is computed."""
  sums = jax.device_get(_checksums(tree))
  return {path: f'{int(s[0]):08x}{int(s[1]):08x}'
          for path, s in leaf_paths(sums).items()}


def verify_checksums(tree, expected, where):
  """Raises CorruptCheckpointError naming the leaves whose checksum differs."""
  got = checksums(tree)
  missing = sorted(set(got) - set(expected))
  bad = sorted(p for p in got if p in expected and got[p] != expected[p])
  if bad or missing:
    raise CorruptCheckpointError(
        f'{where}: array checksums do not match the saved ones for '
        f'{len(bad) + len(missing)} of {len(got)} arrays (first: '
        f'{(bad + missing)[0]}); the array data was damaged after the save.')


# ------------------------------------------------------------ compatibility

def _shape_dtype(leaf):
  return tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype).name


def tree_differences(saved_metadata, abstract):
  """Human-readable differences between a saved tree and the run's, or []."""
  saved = {p: _shape_dtype(l) for p, l in leaf_paths(saved_metadata).items()}
  wanted = {p: _shape_dtype(l) for p, l in leaf_paths(abstract).items()}
  out = [f'{p}: only in the checkpoint' for p in sorted(set(saved) - set(wanted))]
  out += [f'{p}: only in this run' for p in sorted(set(wanted) - set(saved))]
  for p in sorted(set(saved) & set(wanted)):
    if saved[p] != wanted[p]:
      out.append(f'{p}: checkpoint {saved[p][1]}{list(saved[p][0])}, this run '
                 f'{wanted[p][1]}{list(wanted[p][0])}')
  return out


def flat_config(config):
  """The config as {'a.b': json-able value}, for the metadata item."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: json.loads(json.dumps(v, default=str)) for k, v in flat.items()}


def config_differences(saved, current, prefix='model.', ignore=EXECUTION_ONLY_KEYS,
                       ignore_prefixes=()):
  """Keys under `prefix` whose values differ, `ignore`d ones excepted.

  Keys that only one side has (a field added to or removed from the code
  since the save) are left out: the tree comparison shows any that changed a
  shape.
  """
  keys = {k for k in set(saved) & set(current) if k.startswith(prefix)
          and k not in ignore and not k.startswith(tuple(ignore_prefixes))}
  return [f'config.{k}: checkpoint {saved[k]!r}, this run {current[k]!r}'
          for k in sorted(keys) if saved[k] != current[k]]


def resume_differences(saved, current):
  """What makes a checkpoint unresumable in this run: model-defining keys,
  and the input pipeline's (the input position is a cursor into it)."""
  model = config_differences(saved, current, 'model.')
  inputs = config_differences(saved, current, 'input.', INPUT_FREE_KEYS,
                              INPUT_FREE_PREFIXES)
  if inputs:
    inputs[0] = ('the saved input position belongs to another input pipeline: '
                 + inputs[0])
  return model + inputs


# ----------------------------------------------------------- classification

# Status codes (absl / TensorStore / gRPC) that tensorstore and Orbax put in
# their messages, by what they mean for the checkpoint.
_TRANSIENT_CODES = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'ABORTED', 'CANCELLED')
_FATAL_CODES = ('RESOURCE_EXHAUSTED', 'PERMISSION_DENIED', 'UNAUTHENTICATED')
_CORRUPT_CODES = ('DATA_LOSS', 'OUT_OF_RANGE', 'FAILED_PRECONDITION', 'NOT_FOUND',
                  'INVALID_ARGUMENT')


def _chain(exc):
  seen = []
  while exc is not None and exc not in seen:
    seen.append(exc)
    exc = exc.__cause__ or exc.__context__
  return seen


def classify(exc):
  """'corrupt' | 'transient' | 'fatal' for an error raised while restoring.

  The first exception in the cause chain that says what it is decides:
  out-of-memory and permission errors are fatal, storage hiccups transient,
  truncated / missing / undecodable data corrupt. Anything unrecognised is
  fatal: better to stop and show it than to quarantine a good checkpoint.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  chain = _chain(exc)
  for e in chain:
    if isinstance(e, (CorruptCheckpointError, FileNotFoundError,
                      json.JSONDecodeError, tf.errors.DataLossError,
                      tf.errors.NotFoundError, tf.errors.OutOfRangeError)):
      return 'corrupt'
    if isinstance(e, (MemoryError, PermissionError, tf.errors.ResourceExhaustedError,
                      tf.errors.PermissionDeniedError)):
      return 'fatal'
    if isinstance(e, (TimeoutError, ConnectionError, tf.errors.UnavailableError,
                      tf.errors.DeadlineExceededError, tf.errors.AbortedError)):
      return 'transient'
  # TensorStore raises ValueError('<CODE>: ...') under Orbax's wrappers: the
  # innermost cause carries the status code. Only ValueErrors: XLA's runtime
  # errors use the same codes for problems that are not the checkpoint's.
  for e in reversed(chain):
    if not isinstance(e, ValueError):
      continue
    text = str(e)
    for kind, codes in (('fatal', _FATAL_CODES), ('transient', _TRANSIENT_CODES),
                        ('corrupt', _CORRUPT_CODES)):
      if any(text.startswith(code) or f' {code}:' in text for code in codes):
        return kind
  if any(isinstance(e, OSError) for e in chain):   # EIO and the like
    return 'transient'
  return 'fatal'
