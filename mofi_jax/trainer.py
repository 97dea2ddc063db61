"""Train state, sharded initialisation and the jitted update step.

Shapes come from `jax.eval_shape`; parameters are created inside
`jax.jit(..., out_shardings=...)`, so no device ever holds the whole model.
"""
import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics

from mofi_jax import accumulation, losses, optim, sharding
from mofi_jax.models import mofi


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_step: jax.Array   # first step with a non-finite loss/grad, or -1
  skipped_steps: jax.Array    # updates dropped for non-finite values


def dummy_batch(config, batch_size=None):
  """The host batch the train step takes (images as uint8 pixels)."""
  b = batch_size or config.input.batch_size
  s, k, l = config.input.image_size, config.input.max_entities, config.input.text_len
  return {
      'image': jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
      'labels': jax.ShapeDtypeStruct((b, k), jnp.int32),
      'label_weights': jax.ShapeDtypeStruct((b, k), jnp.float32),
      'text': jax.ShapeDtypeStruct((b, l), jnp.int32),
  }


def _init_fn(model, tx, batch):
  def init(rng):
    variables = model.init(rng, jnp.zeros(batch['image'].shape),
                           jnp.ones(batch['text'].shape, jnp.int32))
    params = nn.unbox(variables['params'])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params),
                      nonfinite_step=jnp.full((), -1, jnp.int32),
                      skipped_steps=jnp.zeros((), jnp.int32))
  return init


def state_shardings(model, tx, mesh, batch):
  """(abstract TrainState, its NamedShardings), from shapes only."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), batch['image'],
                         batch['text'])['params']
  param_sh = sharding.tree_shardings(mesh, nn.get_partition_spec(boxed))
  abstract = jax.eval_shape(_init_fn(model, tx, batch), jax.random.key(0))
  rep = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, abstract.opt_state, param_sh,
      transform_non_params=lambda _: rep)
  shardings = TrainState(step=rep, params=param_sh, opt_state=opt_sh,
                         nonfinite_step=rep, skipped_steps=rep)
  return abstract, shardings


def init_state(model, tx, mesh, batch, shardings, seed):
  init = jax.jit(_init_fn(model, tx, batch), out_shardings=shardings)
  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return init(jax.random.key(seed))


def metrics_collection(mode):
  """The CLU collection of train metrics this mode produces."""
  names = ['loss', 'grad_norm']
  if mode in ('supervised', 'multitask'):
    names.append('entity_xent')
  if mode in ('contrastive', 'multitask'):
    names += ['contrastive', 'logit_scale']
  return clu_metrics.Collection.create(
      **{n: clu_metrics.Average.from_output(n) for n in names},
      learning_rate=clu_metrics.LastValue.from_output('learning_rate'))


def make_value_and_grad(model, config, mesh, num_classes):
  """(params, batch) -> ((loss, aux), grads), in config.optim.microbatches pieces."""
  def loss_of_outputs(out, batch):
    total, terms = losses.mofi_loss(out, batch, loss_cfg=config.loss,
                                    num_classes=num_classes, mesh=mesh)
    aux = dict(terms)
    if 'logit_scale' in out:
      aux['logit_scale'] = out['logit_scale']
    return total, aux

  def loss_fn(params, batch):
    return loss_of_outputs(
        model.apply({'params': params}, batch['image'], batch.get('text')), batch)

  def value_and_grad(params, batch):
    m = config.optim.microbatches
    if m > 1 and config.model.mode == 'supervised':  # a mean over examples
      return accumulation.mean_value_and_grad(loss_fn, params, batch, m)
    if m > 1:
      return accumulation.value_and_grad(model, loss_of_outputs, params, batch, m)
    return jax.value_and_grad(loss_fn, has_aux=True)(params, batch)

  return value_and_grad


def make_train_step(model, tx, lr_schedule, config, mesh, num_classes):
  stop_on_nonfinite = config.nonfinite == 'stop'
  collection = metrics_collection(config.model.mode)
  value_and_grad = make_value_and_grad(model, config, mesh, num_classes)

  def train_step(state, batch):
    (loss, aux), grads = value_and_grad(state.params, batch)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = mofi.clamp_logit_scale(optax.apply_updates(state.params, updates),
                                    config.model.logit_scale_max)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # 'stop' freezes the state at the first bad step so the host can report
    # it and checkpoints never hold non-finite values; 'skip' drops the update.
    ok = finite & (state.nonfinite_step < 0) if stop_on_nonfinite else finite
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    first_bad = (~finite) & (state.nonfinite_step < 0)
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_step=jnp.where(first_bad, state.step, state.nonfinite_step),
        skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32))
    scalars = dict(loss=loss, grad_norm=grad_norm,
                   learning_rate=lr_schedule(state.step), **aux)
    return new_state, collection.single_from_model_output(**scalars)

  return train_step


def compile_train_step(train_step, mesh, shardings):
  batch_sh = sharding.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(shardings, batch_sh),
                 out_shardings=(shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))


def make_embed_fn(model, method, mesh, param_shardings, normalize=True):
  """Jitted embeddings (L2-normalised unless `normalize=False`); host batches in, host
  numpy out."""
  def embed(params, x):
    emb = model.apply({'params': params}, x, method=method)
    return losses.l2_normalize(emb) if normalize else emb
  fn = jax.jit(embed, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
               out_shardings=sharding.replicated(mesh))

  shards = sharding.axes_size(mesh, sharding.mesh_axes('batch'))

  def run(params, host_batch):
    n = len(host_batch)
    pad = -n % shards   # any eval batch size works on any mesh
    if pad:
      host_batch = np.concatenate([host_batch, np.zeros_like(host_batch[:1]).repeat(pad, 0)])
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
      out = fn(params, sharding.replicate_host_array(mesh, host_batch))
    return jax.device_get(out.addressable_data(0))[:n]
  return run


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything the loop needs that follows from (config, mesh)."""
  model: Any
  tx: Any
  lr_schedule: Any
  batch_spec: dict
  abstract: TrainState      # shapes only
  shardings: TrainState     # NamedShardings, same tree
  train_step: Any           # jitted with in/out shardings, donates the state

  def init(self, mesh, seed):
    return init_state(self.model, self.tx, mesh, self.batch_spec,
                      self.shardings, seed)


def build(config, mesh):
  """Model, optimizer, state shardings and the compiled-on-first-call step."""
  model = mofi.build(config.model)
  tx, lr_schedule = optim.make(config.optim, config.total_steps,
                               frozen=optim.frozen_modules(config.model))
  batch_spec = dummy_batch(config)
  abstract, shardings = state_shardings(model, tx, mesh, batch_spec)
  step = make_train_step(model, tx, lr_schedule, config, mesh,
                         config.model.head.num_classes)
  return Setup(model, tx, lr_schedule, batch_spec, abstract, shardings,
               compile_train_step(step, mesh, shardings))
