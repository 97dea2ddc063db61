"""Image-to-entity retrieval by the classifier head and by the text tower, and its command."""
import glob
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mofi_jax import evaluate, inference, trainer, user_cache
from mofi_jax.data import pipeline
from mofi_jax.evals import embedding, entities
from mofi_jax.models import mofi
from test_evaluate import STEP, cli_error, random_head, tiny_config


@pytest.fixture(scope='module')
def encoder(tiny_corpus):
  """A tiny multitask model with random weights over the tiny corpus, built in memory
  (test_evaluate covers loading one from a checkpoint)."""
  c = tiny_config(tiny_corpus)
  model = mofi.build(c.model)
  batch = trainer.dummy_batch(c, batch_size=1)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros(batch['image'].shape),
                                        jnp.ones(batch['text'].shape, jnp.int32))['params'])
  params['entity_head'] = random_head(params['entity_head'])
  tokenize, table = inference.corpus_tools(c)
  return inference.Encoder(config=c, params=params, tokenize=tokenize, entities=table,
                           step=STEP, source=f'tiny model (step {STEP})')


@pytest.fixture(scope='module')
def workdir(encoder, tmp_path_factory):
  """A workdir whose config.json is the encoder's (the CLI reads it before loading)."""
  path = str(tmp_path_factory.mktemp('ent_run'))
  inference.write_config(path, encoder.config, encoder.config.input.data_dir)
  return path


@pytest.fixture(scope='module')
def image(tiny_corpus):
  path = sorted(glob.glob(os.path.join(tiny_corpus, 'retrieval', '*.jpg')))[0]
  with open(path, 'rb') as f:
    return path, f.read()


def test_head_scores_and_top_k_by_hand():
  kernel = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 2.0]])  # columns: entities 0, 1, 2
  x = np.array([2.0, 1.0])
  np.testing.assert_allclose(entities.head_scores(x, kernel, np.array([0.0, 0.5, -3.0]), 'linear'),
                             [2.0, 3.5, 3.0])
  cosines = entities.head_scores(x, kernel, None, 'cosine')  # the bias plays no part
  np.testing.assert_allclose(cosines, [2 / np.sqrt(5), 1 / np.sqrt(5), 3 / np.sqrt(10)])
  idx, values = entities.top_k(np.array([0.5, 2.0, 0.5, 1.0]), 3)
  assert idx.tolist() == [1, 3, 0] and values.tolist() == [2.0, 1.0, 0.5]  # tie: lower index
  with pytest.raises(ValueError, match="Unknown head kind 'mlp'"):
    entities.head_scores(x, kernel, None, 'mlp')


def test_rankings_match_independent_computation(encoder, image):
  _, image_bytes = image
  ranked = entities.rank_entities(encoder, image_bytes, k=5)
  pixels = encoder.preprocess([image_bytes])
  # Head: the raw (unnormalised) image embedding through the head, on one device.
  apply = jax.jit(lambda p, x: encoder.model.apply({'params': p}, x,
                                                  method=encoder.model.encode_image))
  raw = np.asarray(apply(jax.device_get(encoder.params), pixels), np.float64)[0]
  kernel, bias, kind = encoder.head_weights()
  assert kind == 'linear'
  logits = raw @ kernel.astype(np.float64) + bias
  order = np.argsort(-logits, kind='stable')[:5]
  assert [e['index'] for e in ranked['head']] == order.tolist()
  np.testing.assert_allclose([e['score'] for e in ranked['head']], logits[order], rtol=1e-4)
  assert [e['name'] for e in ranked['head']] == [encoder.entities.names[i] for i in order]
  # Text tower: cosine to '{name}, {description}' of every entity.
  texts = [f'{n}, {d}' for n, d in zip(encoder.entities.names, encoder.entities.descriptions)]
  assert texts == pipeline.entity_texts(encoder.entities, encoder.config.input.entity_template)
  cosines = encoder.embed_texts(texts) @ encoder.embed_images(pixels)[0]
  order = np.argsort(-cosines, kind='stable')[:5]
  assert [e['index'] for e in ranked['text']] == order.tolist()
  np.testing.assert_allclose([e['score'] for e in ranked['text']], cosines[order], atol=1e-5)
  assert [e['rank'] for e in ranked['text']] == [1, 2, 3, 4, 5]


def test_format_table_puts_both_rankings_side_by_side():
  ranked = {'head': [dict(name='Lequyl', score=12.5), dict(name='Bo', score=3.0)],
            'text': [dict(name='Bo', score=0.81), dict(name='Lequyl', score=0.5)]}
  lines = entities.format_table(ranked).splitlines()
  assert lines[0].startswith('rank  classifier head (logit)') and 'text tower (cosine)' in lines[0]
  assert lines[1].split() == ['1', 'Lequyl', '12.500', 'Bo', '0.810']
  assert lines[2].split() == ['2', 'Bo', '3.000', 'Lequyl', '0.500']
  assert entities.format_table({'head': None, 'text': ranked['text']}).splitlines()[1].split() == [
      '1', 'Bo', '0.810']


def test_command_prints_table_writes_json_and_caches_entity_texts(workdir, encoder, image,
                                                                  tmp_path, monkeypatch, capsys):
  path, image_bytes = image
  monkeypatch.setenv('MOFI_JAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(evaluate.inference, 'load', lambda w, step=None: encoder)  # loaded once
  out = evaluate.main(['entities', '--workdir', workdir, '--image', path, '--k', '3'])
  printed = capsys.readouterr().out.splitlines()
  expected = entities.rank_entities(encoder, image_bytes, k=3)
  assert printed[2].split()[:2] == ['1', expected['head'][0]['name']]
  assert expected['text'][0]['name'] in printed[2]
  stem = os.path.splitext(os.path.basename(path))[0].replace('_', '-')  # '_' separates fields
  assert out['results_file'] == os.path.join(workdir, 'eval', f'entities_{stem}_step{STEP}.json')
  with open(out['results_file']) as f:
    written = json.load(f)
  assert written['step'] == STEP and written['metrics'] == expected
  cached_files = os.listdir(tmp_path / 'cache' / 'entity_texts')
  assert len(cached_files) == 1 and not os.path.exists(os.path.join(workdir, 'eval',
                                                                    cached_files[0]))
  cache = tmp_path / 'cache' / 'entity_texts' / cached_files[0]
  assert np.load(cache).shape == (len(encoder.entities), encoder.config.model.embed_dim)
  assert os.stat(tmp_path / 'cache').st_mode & 0o777 == 0o700
  # A second run reads the cached entity embeddings instead of running the text tower.
  real_embed = embedding.embed_in_batches
  monkeypatch.setattr(embedding, 'embed_in_batches',
                      lambda *a, **k: pytest.fail('entity texts embedded again'))
  cached = entities.rank_entities(encoder, image_bytes, k=3, cache=True)
  assert cached == expected
  # Another template is another key: never the stale numbers of the same length.
  monkeypatch.setattr(embedding, 'embed_in_batches', real_embed)
  other = inference.Encoder.__new__(inference.Encoder)
  other.__dict__.update(encoder.__dict__, config=encoder.config.copy_and_resolve_references())
  with other.config.unlocked():
    other.config.input.entity_template = 'a photo of {name}'
  again = entities.entity_text_embeddings(other, cache=True)
  assert len(os.listdir(tmp_path / 'cache' / 'entity_texts')) == 2
  assert not np.allclose(again, np.load(cache), atol=1e-3)
  bad = tmp_path / 'bad.jpg'
  bad.write_bytes(b'not a jpeg')
  command = ['entities', '--workdir', workdir, '--image']
  assert f'{bad}: unreadable image' in cli_error(*command, str(bad))
  assert 'No such file' in cli_error(*command, str(tmp_path / 'x.jpg'))


def test_without_an_entity_table_the_error_says_so(encoder, image):
  bare = inference.Encoder.__new__(inference.Encoder)
  bare.__dict__.update(encoder.__dict__, entities=None)
  with pytest.raises(ValueError, match=r'no entity table \(entities.jsonl'):
    entities.rank_entities(bare, image[1])


def test_a_cache_file_shipped_in_a_model_folder_is_never_read(workdir, encoder, image, tmp_path,
                                                            monkeypatch):
  """A folder you receive could ship eval/entity_texts_step<N>.npy of the right shape; the
  cache lives in the user's own folder, under a key of the weights and texts."""
  monkeypatch.setenv('MOFI_JAX_CACHE', str(tmp_path / 'cache'))
  planted = np.full((len(encoder.entities), encoder.config.model.embed_dim), 7, np.float32)
  os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
  np.save(os.path.join(workdir, 'eval', f'entity_texts_step{STEP}.npy'), planted)
  got = entities.entity_text_embeddings(encoder, cache=True)
  np.testing.assert_allclose(got, entities.entity_text_embeddings(encoder), atol=1e-6)
  assert not np.allclose(got, 7)
  # A cache folder that is a link (or someone else's) is not used, nor written through:
  # the embeddings are computed, with a warning.
  os.symlink(tmp_path, tmp_path / 'link')
  monkeypatch.setenv('MOFI_JAX_CACHE', str(tmp_path / 'link'))
  with pytest.raises(user_cache.CacheError, match='link'):
    user_cache.folder('entity_texts')
  np.testing.assert_allclose(entities.entity_text_embeddings(encoder, cache=True), got,
                             atol=1e-6)
  assert not (tmp_path / 'entity_texts').exists()
