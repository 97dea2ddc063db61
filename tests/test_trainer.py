"""The update step: sharded over 8 devices == one device; optimizer masks;
non-finite policies; paper-scale configs trace."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import demo, mofi_b16, mofi_h14, mofi_l14
from hlo_utils import collective_shapes
from mofi_jax import optim, sharding, trainer
from mofi_jax.run_setup import with_shardings
from mofi_jax.models import mofi

NUM_CLASSES, VOCAB = 50, 64


def small_config(mode='multitask'):
  c = demo.get_config(mode)
  c.input.batch_size = 16
  c.model.head.num_classes = NUM_CLASSES
  c.model.text.vocab_size = VOCAB
  c.model.image.update(width=32, depth=2, num_heads=2, mlp_dim=64)
  c.model.text.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  c.model.embed_dim = 16
  c.model.head.pad_multiple = 16
  c.loss.tile_size = 8
  c.optim.warmup_steps = 1
  return c


def random_batch(c, seed):
  rng = np.random.default_rng(seed)
  b, s = c.input.batch_size, c.input.image_size
  labels = rng.integers(0, NUM_CLASSES, (b, c.input.max_entities)).astype(np.int32)
  labels[:, 2:] = -1
  weights = (labels >= 0) / (labels >= 0).sum(1, keepdims=True)
  text = rng.integers(1, VOCAB, (b, c.input.text_len)).astype(np.int32)
  text[:, 10:] = 0
  return dict(image=rng.normal(size=(b, s, s, 3)).astype(np.float32),
              labels=labels, label_weights=weights.astype(np.float32), text=text)


def build(c, mesh_cfg, devices=None):
  mesh = sharding.make_mesh(mesh_cfg, devices)
  sharding.activate(mesh)
  return mesh, trainer.build(c, mesh)


def run_steps(c, devices, mesh_cfg, num_steps=3):
  mesh, setup = build(c, mesh_cfg, devices)
  state, step = setup.init(mesh, seed=0), setup.train_step
  losses = []
  for _ in range(num_steps):
    # One batch, repeated: the loss must fall as the model fits it.
    state, metrics = step(state, sharding.global_batch(mesh, random_batch(c, 0)))
    losses.append(float(metrics.compute()['loss']))
  return jax.device_get(state), losses


def test_sharded_step_equals_single_device():
  """Multitask (both losses, all towers) on a 2x2x2 mesh vs one device; the
  single-mode paths are covered loss by loss in test_losses.py."""
  c = small_config('multitask')
  ref_state, ref_losses = run_steps(c, jax.devices()[:1], dict(data=1, fsdp=1, model=1))
  for mesh_cfg in (dict(data=2, fsdp=2, model=2),):
    state, losses = run_steps(c, jax.devices(), mesh_cfg)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    flat, ref = (traverse_util.flatten_dict(s.params) for s in (state, ref_state))
    for k in ref:
      if k[-2:] == ('k', 'bias'):
        # Softmax over keys ignores q.b_k (the same for every key), so the key
        # bias's gradient is zero up to rounding, and Adam turns that rounding
        # into updates of ~lr * g / eps that differ with the summation order.
        # Both must stay far below one real Adam step (~lr).
        for p in (flat[k], ref[k]):
          assert np.abs(p).max() < 1e-2 * c.optim.lr, (k, p)
        continue
      np.testing.assert_allclose(flat[k], ref[k], rtol=2e-4, atol=2e-6,
                                 err_msg=str(k))
  assert ref_losses[-1] < ref_losses[0]


def test_params_are_sharded_not_replicated():
  c = small_config()
  mesh, setup = build(c, dict(data=1, fsdp=-1, model=1))
  state = setup.init(mesh, seed=0)
  kernel = state.params['entity_head']['kernel']
  shard_shapes = {s.data.shape for s in kernel.addressable_shards}
  assert shard_shapes == {(16, kernel.shape[1] // 8)}
  # Adam's moments follow the parameters' sharding.
  mu = state.opt_state[1].mu['entity_head']['kernel']
  assert mu.sharding.spec == kernel.sharding.spec
  fc1 = state.params['image_tower']['encoder']['layers_0']['mlp']['fc1']['kernel']
  assert {s.data.shape for s in fc1.addressable_shards} == {(32 // 8, 64)}


def test_decay_and_head_masks():
  params = {'image_tower': {'proj': {'kernel': 1}, 'ln_post': {'scale': 1, 'bias': 1},
                            'pos_embedding': 1},
            'text_tower': {'token_embedding': {'embedding': 1}},
            'entity_head': {'kernel': 1, 'bias': 1}, 'log_logit_scale': 1}
  decay = traverse_util.flatten_dict(optim.decay_mask(params), sep='/')
  assert {k for k, v in decay.items() if v} == {
      'image_tower/proj/kernel', 'text_tower/token_embedding/embedding',
      'entity_head/kernel'}
  head = traverse_util.flatten_dict(optim.head_mask(params), sep='/')
  assert {k for k, v in head.items() if v} == {'entity_head/kernel', 'entity_head/bias'}


def test_head_lr_multiplier_scales_only_head_updates():
  c = small_config('supervised')
  params = {'entity_head': {'kernel': jnp.ones((2, 2))}, 'w': {'kernel': jnp.ones((2, 2))}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  def update(mult):
    c.optim.head_lr_mult = mult
    tx, _ = optim.make(c.optim, 100)
    state = tx.init(params)
    state = tx.update(grads, state, params)[1]   # past warm-up's zero lr
    return tx.update(grads, state, params)[0]
  base, scaled = update(1.0), update(10.0)
  np.testing.assert_allclose(scaled['entity_head']['kernel'],
                             10 * base['entity_head']['kernel'], rtol=1e-6)
  np.testing.assert_allclose(scaled['w']['kernel'], base['w']['kernel'])


def test_schedule_matches_formula():
  c = small_config()
  c.optim.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
  lr = optim.schedule(c.optim, 110)
  assert float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  expected = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 50 / 100))
  assert float(lr(60)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('policy', ['stop', 'skip'])
def test_nonfinite_step_leaves_state_untouched(policy):
  c = small_config('supervised')
  c.nonfinite = policy
  mesh, setup = build(c, dict(data=1, fsdp=-1, model=1))
  state, step = setup.init(mesh, seed=0), setup.train_step
  state, _ = step(state, sharding.global_batch(mesh, random_batch(c, 0)))
  before = jax.device_get(state.params)
  bad = random_batch(c, 1)
  bad['image'][3, 0, 0, 0] = np.nan
  state, metrics = step(state, sharding.global_batch(mesh, bad))
  assert not np.isfinite(float(metrics.compute()['loss']))
  assert int(state.nonfinite_step) == 1 and int(state.skipped_steps) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  state, _ = step(state, sharding.global_batch(mesh, random_batch(c, 2)))
  moved = any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)))
  # 'stop' freezes the state for the host to report; 'skip' carries on.
  assert moved == (policy == 'skip')


def np_contrastive_dloss_dp(img, txt, scale):
  """float64 d(symmetric InfoNCE)/d(log scale) at scale, embeddings given."""
  img = img / np.linalg.norm(img, axis=1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  cos = img @ txt.T
  def d_xent(c):   # d/ds mean_i -log softmax(s c_i)_i = mean_i (E_p[c_i] - c_ii)
    p = np.exp(scale * c - (scale * c).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return np.mean((p * c).sum(1) - np.diag(c))
  return scale * 0.5 * (d_xent(cos) + d_xent(cos.T))


def test_logit_scale_has_gradient_at_the_cap():
  """exp(min(p, cap)) had zero gradient at and above the cap: once past it,
  the temperature was frozen for good."""
  c = small_config('contrastive')
  mesh, setup = build(c, dict(data=1, fsdp=-1, model=1))
  state = setup.init(mesh, seed=0)
  cap = np.log(c.model.logit_scale_max)
  params = dict(jax.device_get(state.params), log_logit_scale=np.float32(cap))
  batch = random_batch(c, 0)

  def loss(p):
    out = setup.model.apply({'params': p}, batch['image'], batch['text'])
    return mofi_loss_only(out, batch, c, mesh)
  grad = float(jax.grad(loss)(params)['log_logit_scale'])
  out = setup.model.apply({'params': params}, batch['image'], batch['text'])
  expected = np_contrastive_dloss_dp(np.asarray(out['image_emb'], np.float64),
                                     np.asarray(out['text_emb'], np.float64),
                                     c.model.logit_scale_max)
  assert abs(expected) > 1e-3
  assert grad == pytest.approx(expected, rel=1e-3)


def mofi_loss_only(out, batch, c, mesh):
  from mofi_jax import losses  # pylint: disable=g-import-not-at-top
  return losses.mofi_loss(out, batch, loss_cfg=c.loss, num_classes=NUM_CLASSES,
                          mesh=mesh)[0]


def test_logit_scale_is_clamped_after_each_update():
  """Adam moves log scale by ~lr = 0.5 per step, so from just below the cap it
  would pass it at once. At random init the loss wants a smaller scale, so the
  contrastive weight is negated to push it up. The update clamps it to the cap
  exactly, never above."""
  c = small_config('contrastive')
  c.optim.update(lr=0.5, warmup_steps=1, weight_decay=0.0)
  c.model.logit_scale_init = 99.0
  c.loss.contrastive_weight = -1.0
  mesh, setup = build(c, dict(data=1, fsdp=-1, model=1))
  state, step = setup.init(mesh, seed=0), setup.train_step
  cap = np.float32(np.log(c.model.logit_scale_max))
  batch = sharding.global_batch(mesh, random_batch(c, 0))
  values = []
  for _ in range(4):
    state, _ = step(state, batch)
    values.append(np.float32(jax.device_get(state.params['log_logit_scale'])))
  assert all(v <= cap for v in values), values
  assert values[-1] == cap, values


@pytest.mark.parametrize('module', [mofi_b16, mofi_l14, mofi_h14])
@pytest.mark.parametrize('mode', ['supervised', 'contrastive', 'multitask'])
def test_paper_configs_build_and_trace(module, mode):
  c = module.get_config(mode)
  assert c.model.head.num_classes == 2_000_000 and c.input.batch_size == 32_768
  _, setup = build(c, dict(data=1, fsdp=-1, model=1))
  abstract, sh = setup.abstract, setup.shardings
  new_state, _ = jax.eval_shape(setup.train_step, abstract, setup.batch_spec)
  assert jax.tree.map(lambda a: a.shape, new_state.params) == jax.tree.map(
      lambda a: a.shape, abstract.params)
  if mofi.uses_head(mode):
    assert abstract.params['entity_head']['kernel'].shape == (
        c.model.embed_dim, 2_002_944)
    assert sh.params['entity_head']['kernel'].spec == jax.sharding.PartitionSpec(
        None, ('data', 'fsdp', 'model'))


def test_compiled_train_step_moves_no_class_sized_arrays():
  """The whole multitask step on 8 devices: the [B, C] logits and the [D, C]
  kernel (or any class-sized slice of them) never enter a collective."""
  c = small_config('multitask')
  c.model.head.num_classes = 400_000
  c.loss.tile_size = 4096
  _, setup = build(c, dict(data=2, fsdp=2, model=2))
  compiled = setup.train_step.lower(
      with_shardings(setup.abstract, setup.shardings), setup.batch_spec).compile()
  shapes = collective_shapes(compiled.as_text())
  local_classes = 400_000 // 8
  assert any(len(s) == 2 for s in shapes)      # FSDP gathers do happen
  assert all(max(s, default=0) < local_classes for s in shapes), shapes
