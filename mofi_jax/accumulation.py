"""Gradient accumulation over microbatches, exact for the contrastive loss too (GradCache).

Summing microbatch gradients is exact for a loss that is a mean over examples (the entity
loss), not for the contrastive loss, whose every example is a negative for every other. So,
as open_clip does with `--accum-freq`, the step:
  1. embeds every microbatch without gradients (only its embeddings are kept);
  2. computes the loss on the whole batch's embeddings, exactly as without accumulation, and
     its gradient with respect to those embeddings and to the loss's own parameters (the
     logit scale, the entity head);
  3. embeds each microbatch again, now with a VJP against its slice of that gradient, and
     adds up the parameter gradients; the loss parameters' gradient enters once.
By the chain rule the sum is the gradient of the whole-batch loss: M microbatches give the
M = 1 update (tests/test_accumulation.py, to 1e-5 in fp32, all three modes, 8 devices).
Activations live for one microbatch at a time; the towers run forward twice, as with remat.

The entity loss alone (supervised mode) is a mean over examples: `mean_value_and_grad`
runs each microbatch's forward and backward once and averages, with no second forward.
On XLA:CPU it is also the faster step at the same batch: each execution maps fresh pages
for its temporaries, and a microbatch's temporaries are 1/M of the batch's and are reused
by every microbatch of the step (docs/benchmarks.md, "Training").

Microbatch m takes rows m, m + M, m + 2M, ... of the batch, so that every device's
contiguous shard of the batch holds rows of every microbatch and no row moves.
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mofi_jax import sharding


def split(tree, microbatches):
  """[B, ...] leaves -> [M, B/M, ...]: microbatch m is rows m, m + M, ..."""
  def one(x):
    x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    spec = P(None, sharding.mesh_axes('batch'), *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, spec)
  return jax.tree.map(one, tree)


def merge(tree):
  """The inverse of `split`: [M, B/M, ...] -> [B, ...]."""
  def one(x):
    x = x.swapaxes(0, 1)
    x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return jax.lax.with_sharding_constraint(
        x, P(sharding.mesh_axes('batch'), *([None] * (x.ndim - 1))))
  return jax.tree.map(one, tree)


def value_and_grad(model, loss_of_outputs, params, batch, microbatches):
  """((loss, aux), grads) of `loss_of_outputs(model outputs, batch)` over `microbatches`.

  loss_of_outputs(outputs, batch) -> (loss, aux), with outputs as `model.__call__` returns
  them; `model` has `embed(images, text)` and `loss_params()` (models/mofi.py).
  """
  def embed(p, mb):
    return model.apply({'params': p}, mb['image'], mb.get('text'), method='embed')

  inputs = {k: batch[k] for k in ('image', 'text') if k in batch}
  micro = split(inputs, microbatches)
  embeddings = merge(jax.lax.map(lambda mb: embed(params, mb), micro))
  loss_params, loss_params_vjp = jax.vjp(
      lambda p: model.apply({'params': p}, method='loss_params'), params)

  def loss(emb, lp):
    return loss_of_outputs({**emb, **lp}, batch)

  (value, aux), (emb_grads, lp_grads) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(embeddings, loss_params)
  grads = loss_params_vjp(lp_grads)[0]

  def add_microbatch(acc, xs):
    mb, cotangent = xs
    _, vjp = jax.vjp(lambda p: embed(p, mb), params)
    return jax.tree.map(jnp.add, acc, vjp(cotangent)[0]), None

  grads, _ = jax.lax.scan(add_microbatch, grads, (micro, split(emb_grads, microbatches)))
  return (value, aux), grads


def mean_value_and_grad(loss_fn, params, batch, microbatches):
  """((loss, aux), grads) of `loss_fn(params, batch)`, averaged over `microbatches`.

  Exact when the loss and every aux value is a mean over the batch's examples (the
  entity loss), since the microbatches are of equal size.
  """
  micro = split(batch, microbatches)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  one = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                       jax.eval_shape(grad_fn, params, one))

  def add_microbatch(acc, mb):
    return jax.tree.map(jnp.add, acc, grad_fn(params, mb)), None

  total, _ = jax.lax.scan(add_microbatch, zeros, micro)
  return jax.tree.map(lambda x: x / microbatches, total)
