"""inference.load: a saved run comes back with the exact parameters, and the
Encoder's sharded, batched, padded embeddings equal a plain one-device apply."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from mofi_jax import checkpointing, inference, sharding, trainer
from test_trainer import random_batch, small_config


class _NoInput:
  """Stands in for the tf.data iterator, whose position is not under test here."""

  def save(self, path):
    del path


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
  """(workdir, config, params at step 3): a tiny multitask run saved at steps 2 and 3."""
  workdir = str(tmp_path_factory.mktemp('run'))
  c = small_config()
  mesh = sharding.make_mesh(c.mesh)
  sharding.activate(mesh)
  setup = trainer.build(c, mesh)
  state = setup.init(mesh, seed=0)
  ckpt = checkpointing.Checkpointer(workdir, ml_collections.ConfigDict(
      dict(every_steps=1, keep=3, async_save=False)))
  for step in (1, 2, 3):
    state, _ = setup.train_step(state, sharding.global_batch(mesh, random_batch(c, step)))
    if step >= 2:
      ckpt.save(step, state, {}, _NoInput(), force=True)
  ckpt.close()
  inference.write_config(workdir, c, data_dir=os.path.join(workdir, 'no_corpus'))
  jax.set_mesh(None)
  return workdir, c, jax.device_get(state.params)


def test_load_restores_exact_params_of_newest_step(saved_run):
  workdir, _, params = saved_run
  enc = inference.load(workdir)
  assert enc.step == 3
  got = jax.device_get(enc.params)
  jax.tree.map(np.testing.assert_array_equal, got, params)


def test_load_older_step_differs(saved_run):
  workdir, _, params = saved_run
  enc = inference.load(workdir, step=2)
  assert enc.step == 2
  diffs = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - b).max()), jax.device_get(enc.params), params))
  assert max(diffs) > 0


def test_embeddings_equal_single_device_apply(saved_run):
  workdir, c, params = saved_run
  enc = inference.load(workdir)
  rng = np.random.default_rng(0)
  s = c.input.image_size
  images = rng.normal(size=(13, s, s, 3)).astype(np.float32)   # 13: not a multiple of 8
  tokens = random_batch(c, 9)['text'][:11]
  got_img = enc.embed_images(images, batch_size=5)
  got_raw = enc.embed_images(images, batch_size=5, normalize=False)
  got_txt = enc.embed_tokens(tokens, batch_size=4)
  model = enc.model
  ref_img = np.asarray(model.apply({'params': params}, images, method=model.encode_image),
                       np.float64)
  np.testing.assert_allclose(got_raw, ref_img, rtol=1e-5, atol=2e-5)
  assert np.abs(np.linalg.norm(ref_img, axis=1) - 1).max() > 0.1   # raw is not unit length
  ref_txt = np.asarray(model.apply({'params': params}, tokens, method=model.encode_text),
                       np.float64)
  ref_img /= np.linalg.norm(ref_img, axis=1, keepdims=True)
  ref_txt /= np.linalg.norm(ref_txt, axis=1, keepdims=True)
  np.testing.assert_allclose(got_img, ref_img, atol=2e-5)
  np.testing.assert_allclose(got_txt, ref_txt, atol=2e-5)


def test_head_weights_drop_padding(saved_run):
  workdir, c, params = saved_run
  kernel, bias, kind = inference.load(workdir).head_weights()
  n = c.model.head.num_classes
  assert kind == 'linear' and kernel.shape == (c.model.embed_dim, n) and bias.shape == (n,)
  np.testing.assert_array_equal(kernel, params['entity_head']['kernel'][:, :n])


def test_config_round_trips_with_data_dir(saved_run):
  workdir, c, _ = saved_run
  got = inference.read_config(workdir)
  assert got.input.data_dir == os.path.join(workdir, 'no_corpus')
  assert got.model.to_dict() == json.loads(c.model.to_json())


def test_errors_name_the_problem(saved_run, tmp_path):
  workdir, _, _ = saved_run
  with pytest.raises(inference.LoadError, match='config.json not found'):
    inference.load(str(tmp_path))
  with pytest.raises(inference.LoadError, match=r'no checkpoint for step 7; available steps: \[2, 3\]'):
    inference.load(workdir, step=7)
  inference.write_config(str(tmp_path), small_config(), data_dir='x')
  with pytest.raises(inference.LoadError, match='no checkpoints folder'):
    inference.load(str(tmp_path))
  enc = inference.load(workdir)
  with pytest.raises(inference.LoadError, match='no tokenizer'):
    enc.embed_texts(['a'])
