"""Image-text retrieval (evals/image_text.py): recall@K both ways against a float64 NumPy
argsort over every pair, by hand on ties, and through the evaluate CLI on the held-out
images with captions whose embeddings the test computes itself."""
import json
import os

import numpy as np
import pytest

from mofi_jax.evals import image_text
from test_evaluate import (cli_error, encoder, heldout, loaded_once, run_cli,  # pylint: disable=unused-import
                           tiny_run)


def reference_recalls(image_emb, text_emb, owner, ks=image_text.KS):
  """Every caption's and every image's full ranking by a stable argsort (float64)."""
  s = np.asarray(text_emb, np.float64) @ np.asarray(image_emb, np.float64).T   # [T, N]
  out = {}
  for k in ks:
    text_hits = [owner[t] in np.argsort(-s[t], kind='stable')[:k] for t in range(len(s))]
    image_hits = [bool(set(np.argsort(-s[:, i], kind='stable')[:k]) &
                       set(np.flatnonzero(owner == i))) for i in range(s.shape[1])]
    out[f'image_retrieval_recall@{k}'] = float(np.mean(text_hits))
    out[f'text_retrieval_recall@{k}'] = float(np.mean(image_hits))
  return out


@pytest.mark.parametrize('num_images, per_image', [(7, 1), (300, 5)])
def test_recalls_equal_full_argsort(num_images, per_image, monkeypatch):
  monkeypatch.setattr(image_text, '_BLOCK', 64)   # several blocks both ways
  rng = np.random.default_rng(num_images)
  images = rng.normal(size=(num_images, 12))
  owner = np.repeat(np.arange(num_images), per_image)
  texts = images[owner] + 1.2 * rng.normal(size=(len(owner), 12))
  shuffled = rng.permutation(len(owner))   # an image's captions anywhere in the list
  owner, texts = owner[shuffled], texts[shuffled]
  got = image_text.retrieval_recalls(images, texts, owner)
  assert got == pytest.approx(reference_recalls(images, texts, owner), abs=1e-12)
  assert 0 < got['image_retrieval_recall@1'] < got['image_retrieval_recall@10'] <= 1


def test_ties_rank_the_lower_index_first():
  images = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])    # images 0 and 1 are the same
  texts = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  got = image_text.retrieval_recalls(images, texts, np.array([0, 1, 2]), ks=(1, 2))
  assert got['image_retrieval_recall@1'] == pytest.approx(2 / 3)   # caption 1 ranks image 0 first
  assert got['image_retrieval_recall@2'] == 1.0


def write_captions(folder, heldout_set, fmt):
  """The held-out images with two captions each: its category name, and a numbered one."""
  root, categories, names, _ = heldout_set
  files = sorted(f for f in os.listdir(root) if f.endswith('.jpg'))
  files.sort(key=lambda n: (int(n.split('_')[0]), n))
  rows = [(f, [names[c], f'photo {i} of {names[c]}']) for i, (f, c) in
          enumerate(zip(files, categories))]
  os.symlink(root, folder / 'images')
  if fmt == 'jsonl':
    (folder / 'captions.jsonl').write_text(''.join(
        json.dumps({'image': f'images/{f}', 'captions': caps}) + '\n' for f, caps in rows))
  else:
    lines = ['image,caption'] + [f'images/{f},"{c}"' for f, caps in rows for c in caps]
    (folder / 'captions.csv').write_text('\n'.join(lines) + '\n')
  return [c for _, caps in rows for c in caps]


@pytest.mark.parametrize('fmt', ['jsonl', 'csv'])
def test_cli_on_captions_equals_the_encoders_embeddings(tiny_run, encoder, heldout, loaded_once,
                                                         capsys, tmp_path, fmt):
  captions = write_captions(tmp_path, heldout, fmt)
  out = run_cli(capsys, 'image_text', '--workdir', tiny_run, '--data_dir', str(tmp_path))
  _, _, _, features = heldout
  owner = np.repeat(np.arange(len(features)), 2)
  want = reference_recalls(features, encoder.embed_texts(captions), owner)
  m = out['metrics']
  assert (m['num_images'], m['num_captions']) == (len(features), len(captions))
  assert {k: m[k] for k in want} == pytest.approx(want, abs=1e-9)


def test_bad_captions_are_named(tiny_run, heldout, loaded_once, tmp_path):
  write_captions(tmp_path, heldout, 'jsonl')
  with open(tmp_path / 'captions.jsonl', 'a') as f:
    f.write(json.dumps({'image': '../outside.jpg', 'captions': ['x']}) + '\n')
  message = cli_error('image_text', '--workdir', tiny_run, '--data_dir', str(tmp_path))
  assert 'captions.jsonl:51' in message and 'outside' in message
  (tmp_path / 'captions.jsonl').write_text('{"image": "images/none.jpg", "captions": []}\n')
  message = cli_error('image_text', '--workdir', tiny_run, '--data_dir', str(tmp_path))
  assert 'captions.jsonl:1' in message and 'at least one caption' in message
  os.remove(tmp_path / 'captions.jsonl')
  message = cli_error('image_text', '--workdir', tiny_run, '--data_dir', str(tmp_path))
  assert 'no captions.jsonl or captions.csv' in message
