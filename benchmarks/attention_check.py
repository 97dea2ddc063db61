r"""One attention kernel against the XLA reference, in value and gradient, at a
ViT's shapes: the fused kernel is checked on the machine it will be timed on.

  python benchmarks/attention_check.py --implementation cudnn --dtype bfloat16

The reference runs the same inputs in float32. Prints one line per case
(bidirectional: the image tower; causal: the text tower) with the largest error
relative to the reference's largest magnitude, and exits 1 if any exceeds --tol.
"""
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from mofi_jax.models import attention

FLAGS = flags.FLAGS
flags.DEFINE_enum('implementation', 'cudnn', attention.IMPLEMENTATIONS, 'Kernel to check.')
flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16'], 'Kernel input dtype.')
flags.DEFINE_integer('batch', 8, 'Batch.')
flags.DEFINE_integer('heads', 12, 'Heads.')
flags.DEFINE_integer('head_dim', 64, 'Head dimension.')
flags.DEFINE_integer('image_len', 197, 'Image tokens (B/16 at 224 px).')
flags.DEFINE_integer('text_len', 77, 'Text tokens.')
flags.DEFINE_float('tol', 2e-2, 'Largest allowed relative error (bf16: ~1e-2).')


def value_and_grads(implementation, q, k, v, causal):
  head_major = implementation in attention.HEAD_MAJOR
  to = lambda a: a.transpose(0, 2, 1, 3) if head_major else a
  w = jax.random.normal(jax.random.key(3), q.shape, jnp.float32)
  def loss(q, k, v):
    y = to(attention.attend(to(q), to(k), to(v), causal, implementation))
    return jnp.sum(y.astype(jnp.float32) * w), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return (y, *grads)


def relative_error(got, want):
  got, want = got.astype(jnp.float32), want.astype(jnp.float32)
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def main(argv):
  del argv
  dtype = jnp.dtype(FLAGS.dtype)
  worst = 0.0
  for name, length, causal in (('image', FLAGS.image_len, False),
                               ('text', FLAGS.text_len, True)):
    shape = (FLAGS.batch, length, FLAGS.heads, FLAGS.head_dim)
    q, k, v = (jax.random.normal(key, shape, jnp.float32)
               for key in jax.random.split(jax.random.key(0), 3))
    got = value_and_grads(FLAGS.implementation, *(a.astype(dtype) for a in (q, k, v)), causal)
    want = value_and_grads('xla', q, k, v, causal)
    errors = [relative_error(g, w) for g, w in zip(got, want)]
    worst = max(worst, *errors)
    print(f'attention {FLAGS.implementation} {FLAGS.dtype} {name} causal={causal} '
          f'shape={shape}: rel_err out={errors[0]:.2e} dq={errors[1]:.2e} '
          f'dk={errors[2]:.2e} dv={errors[3]:.2e} on {jax.devices()[0].platform}')
  ok = worst <= FLAGS.tol
  print(f'attention_check: {"OK" if ok else "FAILED"} (worst {worst:.2e}, tol {FLAGS.tol:.0e})')
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  app.run(main)
