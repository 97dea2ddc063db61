"""interop.savedmodel: the encoders through jax2tf into a TF SavedModel, with
serving signatures of polymorphic batch size, equal to our JAX model."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from mofi_jax import inference, losses
from mofi_jax.interop import savedmodel
from test_interop_hf import jax_features, random_images, random_params, tiny_config


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """(encoder, loaded SavedModel, folder) of a random contrastive ViT/16 with
  scanned layers, serialised for every default platform."""
  config = tiny_config(patch=16, image_size=32, scan=True, text_act='quick_gelu')
  encoder = inference.Encoder(config=config, params=random_params(config, seed=5),
                              source='random')
  out = savedmodel.export_savedmodel(encoder, str(tmp_path_factory.mktemp('sm') / 'model'))
  return encoder, tf.saved_model.load(out), out


def random_tokens(n, vocab, length, seed):
  """<bos> ids... <eot> then 0-padding, of random lengths (our tokenizer's layout)."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((n, length), np.int32)
  for row in tokens:
    k = rng.integers(0, length - 1)
    row[:k + 2] = [1, *rng.integers(3, vocab, k), 2]
  return tokens


def test_signatures_take_any_batch_size(exported):
  _, loaded, out = exported
  assert set(loaded.signatures) == {'serving_default', 'embed_images', 'embed_tokens'}
  images = loaded.signatures['embed_images'].structured_input_signature[1]['images']
  tokens = loaded.signatures['embed_tokens'].structured_input_signature[1]['tokens']
  assert images.shape.as_list() == [None, 32, 32, 3] and images.dtype == tf.float32
  assert tokens.shape.as_list() == [None, 12] and tokens.dtype == tf.int32
  with open(os.path.join(out, savedmodel.INFO_FILE)) as f:
    info = json.load(f)
  assert info['platforms'] == ['cpu', 'cuda', 'tpu'] and info['text_pool'] == 'last_nonpad'


@pytest.mark.parametrize('batch', [1, 5])
def test_savedmodel_equals_jax(exported, batch):
  encoder, loaded, _ = exported
  images = random_images(batch, 32, seed=batch)
  got = loaded.signatures['serving_default'](images=tf.constant(images))
  want = jax_features(encoder.config, encoder.params, images)
  np.testing.assert_allclose(got['features'].numpy(), want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got['embedding'].numpy(), losses.l2_normalize(want),
                             atol=1e-5, rtol=0)
  tokens = random_tokens(batch + 1, 300, 12, seed=batch)
  got = loaded.signatures['embed_tokens'](tokens=tf.constant(tokens))
  want = jax_features(encoder.config, encoder.params, tokens=tokens)
  np.testing.assert_allclose(got['features'].numpy(), want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got['embedding'].numpy(), losses.l2_normalize(want),
                             atol=1e-5, rtol=0)
