"""AdamW with warm-up + cosine decay, global-norm clipping, decay only on kernels,
an optional learning-rate multiplier for the entity head, and frozen towers (LiT's
locked image tower: no update)."""
import optax
from flax import traverse_util


def schedule(cfg, total_steps):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=max(total_steps, cfg.warmup_steps + 1),
      end_value=cfg.lr * cfg.min_lr_ratio)


def _path_mask(params, predicate):
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: predicate(k) for k in flat})


def decay_mask(params):
  # big_vision's convention: decay kernels (and token embeddings); never
  # norms, biases, scales, position embeddings or the logit scale.
  return _path_mask(params, lambda path: path[-1] in ('kernel', 'embedding'))


def head_mask(params):
  return _path_mask(params, lambda path: 'entity_head' in path)


def frozen_modules(model_cfg):
  """Top-level parameter collections that never change (config.model.lock_image)."""
  return ('image_tower',) if model_cfg.get('lock_image', False) else ()


def make(cfg, total_steps, frozen=()):
  """(optax transform, lr schedule); `frozen`: top-level parameter names left as they are."""
  lr = schedule(cfg, total_steps)
  parts = [
      optax.clip_by_global_norm(cfg.clip_norm),
      # mu_dtype bfloat16 halves the first moment's bytes (big_vision's default).
      optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                          mu_dtype=cfg.get('mu_dtype', 'float32')),
      optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(lr),
  ]
  if cfg.head_lr_mult != 1.0:
    parts.append(optax.masked(optax.scale(cfg.head_lr_mult), head_mask))
  tx = optax.chain(*parts)
  if frozen:
    # The model stops the frozen tower's gradient (Mofi.lock_image), so clipping and Adam
    # see zeros there; this zeroes the weight decay too. Its Adam moments stay allocated
    # (at zero): optax.masked/multi_transform around the chain would drop them, but their
    # states do not map onto parameter shardings (optax.tree_map_params).
    is_frozen = lambda params: _path_mask(params, lambda path: path[0] in frozen)
    tx = optax.chain(tx, optax.masked(optax.set_to_zero(), is_frozen))
  return tx, lr
