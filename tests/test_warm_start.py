"""config.init.workdir (mofi_jax/warm_start.py) on a checkpoint saved as training saves it
(test_export.make_workdir: a multitask model with random weights everywhere): what each
`load` takes is the source's leaves bit for bit, the rest is this run's fresh init, every
leaf keeps this run's sharding; an architecture that differs is refused by name. And
config.model.lock_image (LiT): the image tower never moves and holds no optimizer state,
with the loss of the unlocked model."""
import os

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from mofi_jax import inference, optim, sharding, trainer, warm_start
from test_export import make_workdir
from test_trainer import random_batch, small_config


@pytest.fixture(scope='module')
def source(tiny_corpus, tmp_path_factory):
  return make_workdir(tiny_corpus, str(tmp_path_factory.mktemp('warm') / 'source'))


def fresh(config, seed=3):
  mesh = sharding.make_mesh(config.mesh)
  return mesh, trainer.build(config, mesh).init(mesh, seed).params


def flat(params):
  return traverse_util.flatten_dict(jax.device_get(params))


def run_config(source, **init):
  config = inference.read_config(source)
  config.init.update(workdir=source, **init)
  return config


@pytest.mark.parametrize('load', ['image', 'towers', 'towers+head'])
def test_load_takes_exactly_the_named_parts(source, load):
  config = run_config(source, load=load)
  mesh, params = fresh(config)
  before = flat(params)
  got = warm_start.init_from_workdir(params, config, mesh)
  saved = flat(inference.load(source).params)
  taken = warm_start.LOADS[load]
  for path, leaf in flat(got).items():
    want = saved[path] if path[0] in taken else before[path]
    np.testing.assert_array_equal(leaf, want, err_msg='/'.join(path))
  assert any(not np.array_equal(saved[p], before[p]) for p in before)   # not vacuous
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    assert a.sharding == b.sharding and a.dtype == b.dtype


def test_a_supervised_run_takes_the_image_tower_and_keeps_a_fresh_head(source):
  config = run_config(source)
  config.model.mode = 'supervised'
  mesh, params = fresh(config)
  got = flat(warm_start.init_from_workdir(params, config, mesh))
  saved, before = flat(inference.load(source).params), flat(params)
  assert {p[0] for p in got} == {'image_tower', 'entity_head'}
  for path, leaf in got.items():
    np.testing.assert_array_equal(leaf, (saved if path[0] == 'image_tower' else before)[path])


@pytest.mark.parametrize('edit, message', [
    (lambda c: c.model.image.update(num_heads=2), 'config.model.image.num_heads=4 there, 2'),
    (lambda c: c.model.update(scan=False), 'config.model.scan=True there, False here'),
    (lambda c: c.init.update(hf_clip='/somewhere'), 'both set'),
    (lambda c: c.init.update(load='head'), "config.init.load='head'"),
])
def test_a_different_architecture_or_setting_is_refused_by_name(source, edit, message):
  config = run_config(source)
  edit(config)
  mesh, params = (None, None) if 'init' in message or 'both' in message else fresh(config)
  with pytest.raises(warm_start.WarmStartError, match=message.replace('(', r'\(')):
    warm_start.init_from_workdir(params, config, mesh)


def test_a_head_of_another_size_is_refused_for_towers_plus_head(source):
  config = run_config(source, load='towers+head')
  config.model.head.num_classes += 1   # the same padded width: shapes alone would pass
  mesh, params = fresh(config)
  with pytest.raises(warm_start.WarmStartError, match='config.model.head.num_classes=20 there'):
    warm_start.init_from_workdir(params, config, mesh)
  config.init.load = 'towers'   # a fresh head of the new size is fine
  warm_start.init_from_workdir(params, config, mesh)


def test_a_text_tower_is_refused_for_another_tokenizer(source, tmp_path):
  config = run_config(source)
  mesh, params = fresh(config)
  other = tmp_path / 'corpus'
  other.mkdir()
  with open(os.path.join(config.input.data_dir, 'tokenizer.json'), 'rb') as f:
    data = f.read()
  (other / 'tokenizer.json').write_bytes(data.replace(b'"<pad>"', b'"<PAD>"'))
  with pytest.raises(warm_start.WarmStartError, match='reads another tokenizer.*differ'):
    warm_start.init_from_workdir(params, config, mesh, data_dir=str(other))
  (other / 'tokenizer.json').write_bytes(data)   # the same file elsewhere is fine
  warm_start.init_from_workdir(params, config, mesh, data_dir=str(other))
  config.init.load = 'image'                      # and no text tower, no check
  (other / 'tokenizer.json').write_text('{}')
  warm_start.init_from_workdir(params, config, mesh, data_dir=str(other))


def test_fields_left_unset_read_as_the_towers_defaults(source):
  config = run_config(source)
  config.model.image = {k: v for k, v in config.model.image.items() if k not in ('pool', 'ln_pre')}
  mesh, params = fresh(config)
  got = flat(warm_start.init_from_workdir(params, config, mesh))
  saved = flat(inference.load(source).params)
  for path in (p for p in got if p[0] == 'image_tower'):
    np.testing.assert_array_equal(got[path], saved[path])


# ----------------------------------------------------------------------------
# LiT: config.model.lock_image.


def _steps(config, n=3):
  mesh = sharding.make_mesh(config.mesh)
  setup = trainer.build(config, mesh)
  state = setup.init(mesh, seed=0)
  start = flat(state.params)
  losses = []
  for i in range(n):
    state, metrics = setup.train_step(state, sharding.global_batch(mesh, random_batch(config, i)))
    losses.append(float(metrics.compute()['loss']))
  return start, flat(state.params), state, losses


def test_lock_image_freezes_the_image_tower_only():
  config = small_config('contrastive')
  config.optim.warmup_steps = 1
  config.model.lock_image = True
  start, end, state, locked_losses = _steps(config)
  for path in start:
    same = np.array_equal(start[path], end[path])
    assert same == (path[0] == 'image_tower'), '/'.join(path)
  # No gradient reaches the frozen tower: its Adam moments are still zero.
  mu = flat(optax.tree_utils.tree_get(state.opt_state, 'mu'))
  assert all(not x.any() for p, x in mu.items() if p[0] == 'image_tower')
  assert any(x.any() for p, x in mu.items() if p[0] == 'text_tower')
  # The forward pass is the unlocked model's: the same loss before the first update.
  config.model.lock_image = False
  _, _, _, free_losses = _steps(config, n=1)
  assert locked_losses[0] == pytest.approx(free_losses[0], rel=1e-6)


def test_frozen_labels_follow_lock_image():
  config = small_config('contrastive')
  assert optim.frozen_modules(config.model) == ()
  config.model.lock_image = True
  assert optim.frozen_modules(config.model) == ('image_tower',)
