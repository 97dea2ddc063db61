"""`python -m mofi_jax.export --format open_clip` against open_clip and CLIP_benchmark themselves:
open_clip's CLIP built from the exported config and weights gives our features (random
towers, every activation open_clip can express); the exported folder loads with
`create_model_and_transforms('local-dir:OUT')` and `get_tokenizer`, whose ids, pixels and
features are ours; `clip_benchmark eval` on that folder, offline, scores our ImageFolder and
captions folder (converted by interop.clip_benchmark_data) exactly as our evaluate CLI does."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from mofi_jax import export, losses
from mofi_jax.data import tokenizer as tokenizer_lib
from mofi_jax.interop import clip_benchmark_data, clip_tokenizer, hf_export, open_clip_export
from mofi_jax.interop.clip_config import InteropError
from test_evaluate import (STEP, encoder, heldout, loaded_once, run_cli,  # pylint: disable=unused-import
                           tiny_run)
from test_interop_hf import (TEXTS, corpus_tokenizer, jax_features, random_images,  # pylint: disable=unused-import
                             random_params, tiny_config)
from test_export import random_pngs

TEMPLATE = 'a photo of a {}.'


def open_clip_model(config, params, tok):
  """open_clip.CLIP from our export's model_cfg and tensors, strictly loaded."""
  ids = clip_tokenizer.plan_text_ids(dict(config.model.text), tok, tok.get_vocab_size())
  model_cfg = open_clip_export.open_clip_model_cfg(config, ids, 'unused')
  hf = hf_export.clip_params.swap_token_rows(
      hf_export.clip_params.to_hf(params, config.model), ids.swap)
  model = open_clip.model.CLIP(**model_cfg).eval()
  result = model.load_state_dict({k: torch.from_numpy(v) for k, v in
                                  open_clip_export.to_open_clip(hf).items()},
                                 strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  return model, ids


@pytest.mark.parametrize('case', [
    dict(act='quick_gelu', text_act='quick_gelu', scan=True, patch=14, image_size=28),
    dict(act='gelu_pytorch_tanh', text_act='gelu', width=48, heads=6, depth=3, embed_dim=16),
])
def test_open_clip_model_gives_our_features(case, corpus_tokenizer):
  tok = corpus_tokenizer
  config = tiny_config(vocab_size=tok.get_vocab_size(), **case)
  params = random_params(config, seed=2)
  model, ids = open_clip_model(config, params, tok)
  images = random_images(3, config.input.image_size)
  with torch.no_grad():
    theirs = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(theirs, jax_features(config, params, images), atol=1e-4, rtol=0)

  tokens = tokenizer_lib.tokenize(tok, TEXTS, config.input.text_len)
  a, b = ids.swap
  theirs_ids = np.where(tokens == a, b, np.where(tokens == b, a, tokens))   # the export's ids
  with torch.no_grad():
    theirs = model.encode_text(torch.as_tensor(theirs_ids).long()).numpy()
  ours = jax_features(config, params, tokens=tokens)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  assert np.abs(ours[0] - ours[1]).max() > 1e-2   # texts differ: the comparison is not vacuous


def test_towers_with_and_without_quick_gelu_are_refused(corpus_tokenizer):
  config = tiny_config(act='quick_gelu', text_act='gelu',
                       vocab_size=corpus_tokenizer.get_vocab_size())
  with pytest.raises(InteropError, match="config.model.image.act='quick_gelu'.*both"):
    open_clip_export.open_clip_model_cfg(config, None, 'x')


# ----------------------------------------------------------------------------
# The exported folder, through open_clip's own loaders.


@pytest.fixture(scope='module')
def open_clip_out(tiny_run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('open_clip') / 'exported')
  assert export.main(['--workdir', tiny_run, '--format', 'open_clip', '--out', out]) == out
  return out


def test_local_dir_loads_with_our_tokenizer_pixels_and_features(open_clip_out, encoder):
  model, _, preprocess = open_clip.create_model_and_transforms(f'local-dir:{open_clip_out}')
  tokenizer = open_clip.get_tokenizer(f'local-dir:{open_clip_out}')
  model.eval()
  texts = ['a photo of a cat', 'Lequyl, a cyan star', 'x' * 40, 'wow!! a dog']
  ids = tokenizer(texts).numpy()
  ours = encoder.tokenize(texts)
  vocab = encoder.config.model.text.vocab_size
  np.testing.assert_array_equal(ids, np.where(ours == 2, vocab - 1,
                                              np.where(ours == vocab - 1, 2, ours)))
  with torch.no_grad():
    txt = model.encode_text(torch.as_tensor(ids), normalize=True).numpy()
  np.testing.assert_allclose(txt, encoder.embed_texts(texts), atol=1e-4, rtol=0)

  # At the model's size neither pipeline resamples: pixels agree to float precision.
  size = encoder.image_size
  images = random_pngs(3, (size, size, 3), seed=4)
  theirs = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images])
  ours_pixels = encoder.preprocess(images)
  np.testing.assert_allclose(theirs.numpy().transpose(0, 2, 3, 1), ours_pixels, atol=1e-5,
                             rtol=0)
  with torch.no_grad():
    img = model.encode_image(theirs, normalize=True).numpy()
  np.testing.assert_allclose(img, encoder.embed_images(ours_pixels), atol=1e-4, rtol=0)
  # Resampled (PIL's antialiased bilinear against TF's): the same filter, rounded to uint8.
  other = random_pngs(2, (45, 31, 3), seed=5)
  theirs = np.stack([preprocess(Image.open(io.BytesIO(b))).numpy() for b in other])
  assert np.abs(theirs.transpose(0, 2, 3, 1) - encoder.preprocess(other)).mean() < 0.02

  with open(os.path.join(open_clip_out, open_clip_export.CONFIG_FILE)) as f:
    cfg = json.load(f)
  assert cfg['preprocess_cfg']['size'] == size and cfg['model_cfg']['quick_gelu'] is False
  with open(os.path.join(open_clip_out, hf_export.INFO_FILE)) as f:
    assert json.load(f)['format'] == 'open_clip'
  assert sorted(n for n in os.listdir(open_clip_out) if not n.startswith('.')) == sorted([
      'entities.jsonl', 'entity_head.safetensors', 'export_info.json',
      'open_clip_config.json', 'open_clip_model.safetensors', 'tokenizer.json',
      'tokenizer_config.json'])


# ----------------------------------------------------------------------------
# CLIP_benchmark on the exported folder against our evaluate CLI, on the same images.


def _png(image):
  buf = io.BytesIO()
  image.save(buf, format='PNG')
  return buf.getvalue()


def write_ours(root, heldout_set, size):
  """The held-out images at the model's size (PNG, so that no decoder or resampler can
  differ) as our ImageFolder (classes/) and captions folder (two captions an image)."""
  folder, categories, names, _ = heldout_set
  files = sorted(f for f in os.listdir(folder) if f.endswith('.jpg'))
  files.sort(key=lambda n: (int(n.split('_')[0]), n))
  ours = root / 'ours'
  (ours / 'classes').mkdir(parents=True)
  (ours / 'classes' / 'classnames.txt').write_text('\n'.join(names) + '\n')
  captions = []
  for i, (name, c) in enumerate(zip(files, categories)):
    image = Image.open(os.path.join(folder, name)).convert('RGB').resize((size, size))
    data, key = _png(image), f'{i:05d}'
    class_dir = ours / 'classes' / f'{c:03d}'
    class_dir.mkdir(exist_ok=True)
    (class_dir / f'{key}.png').write_bytes(data)
    (ours / f'{key}.png').write_bytes(data)
    captions.append({'image': f'{key}.png', 'captions': [names[c], f'photo {i} of {names[c]}']})
  (ours / 'captions.jsonl').write_text(''.join(json.dumps(c) + '\n' for c in captions))
  return ours


def clip_benchmark(model_dir, dataset_root, task, output):
  # clip_benchmark's CLI; its `accuracy` needs a repair under NumPy >= 2.4 (the module says).
  cmd = [sys.executable, '-m', 'mofi_jax.interop.clip_benchmark_cli', 'eval',
         '--model_type', 'open_clip', '--model', f'local-dir:{model_dir}',
         '--pretrained', 'none', '--dataset', 'wds/tiny', '--dataset_root', str(dataset_root),
         '--task', task, '--recall_k', '1', '5', '10', '--batch_size', '16',
         '--num_workers', '0', '--no_amp', '--output', str(output)]
  env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(output) as f:
    return json.load(f)['metrics']


def test_clip_benchmark_on_the_export_scores_as_our_evaluate(
    open_clip_out, tiny_run, heldout, loaded_once, capsys, tmp_path):
  size = int(json.load(open(os.path.join(tiny_run, 'config.json')))['input']['image_size'])
  ours = write_ours(tmp_path, heldout, size)
  wds_cls, wds_ret = tmp_path / 'wds_cls', tmp_path / 'wds_ret'
  clip_benchmark_data.main(['--imagefolder', str(ours / 'classes'), '--split', 'all',
                            '--templates', TEMPLATE, '--out', str(wds_cls)])
  clip_benchmark_data.main(['--captions', str(ours), '--out', str(wds_ret)])
  theirs_cls = clip_benchmark(open_clip_out, wds_cls, 'zeroshot_classification',
                              tmp_path / 'cls.json')
  theirs_ret = clip_benchmark(open_clip_out, wds_ret, 'zeroshot_retrieval',
                              tmp_path / 'ret.json')
  ours_cls = run_cli(capsys, 'zeroshot', '--workdir', tiny_run, '--dataset', 'imagefolder',
                     '--data_dir', str(ours / 'classes'), '--split', 'all',
                     '--templates', TEMPLATE)['metrics']
  ours_ret = run_cli(capsys, 'image_text', '--workdir', tiny_run,
                     '--data_dir', str(ours))['metrics']
  assert ours_cls['num_examples'] == len(heldout[1])
  for key in ('acc1', 'acc5', 'mean_per_class_recall'):
    assert theirs_cls[key] == pytest.approx(ours_cls[key], abs=1e-9), key
  for k in (1, 5, 10):
    for key in (f'image_retrieval_recall@{k}', f'text_retrieval_recall@{k}'):
      # CLIP_benchmark averages in float32: 0.09 comes back as 0.0900000036.
      assert theirs_ret[key] == pytest.approx(ours_ret[key], abs=1e-6), key
  # Random towers still rank: the figures are not all 0 or all 1.
  assert 0 < ours_ret['image_retrieval_recall@1'] < 1


def test_clip_benchmark_data_writes_what_the_folder_holds(tmp_path):
  """Every image once, with its class; JPEG bytes copied, BMP re-encoded as PNG (decoded to
  the same pixels); names and templates in CLIP_benchmark's spelling; a non-empty --out is
  refused in one line and left alone."""
  import tarfile  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  src = tmp_path / 'folder'
  pixels = {}
  for c, name in enumerate(['b_dog', 'a_cat']):
    (src / name).mkdir(parents=True)
    for i, fmt in enumerate(['JPEG', 'BMP']):
      arr = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
      path = src / name / f'{i}.{"JPG" if fmt == "JPEG" else "bmp"}'
      Image.fromarray(arr).save(path, format=fmt)
      pixels[(1 - c, i)] = (path.read_bytes(), arr)   # classes sort: a_cat=0, b_dog=1
  out = tmp_path / 'wds'
  clip_benchmark_data.main(['--imagefolder', str(src), '--split', 'all',
                            '--templates', 'a {} on a mat.', '--out', str(out)])
  assert (out / 'classnames.txt').read_text() == 'a cat\nb dog\n'
  assert (out / 'zeroshot_classification_templates.txt').read_text() == 'a {c} on a mat.\n'
  assert (out / 'test' / 'nshards.txt').read_text() == '1\n'
  with tarfile.open(out / 'test' / '0.tar') as tar:
    members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
  keys = sorted({n.split('.')[0] for n in members})
  assert len(keys) == 4
  for key, (c, i) in zip(keys, sorted(pixels)):
    assert int(members[f'{key}.cls']) == c
    raw, arr = pixels[(c, i)]
    if i == 0:
      assert members[f'{key}.jpg'] == raw
    else:
      np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(members[f'{key}.png']))),
                                    arr)
  before = sorted(p.name for p in out.rglob('*'))
  proc = subprocess.run([sys.executable, '-m', 'mofi_jax.interop.clip_benchmark_data',
                         '--imagefolder', str(src), '--out', str(out)],
                        capture_output=True, text=True, check=False,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3'))
  errors = [l for l in proc.stderr.splitlines() if l.startswith(clip_benchmark_data.TOOL)]
  assert proc.returncode != 0 and len(errors) == 1 and str(out) in errors[0], proc.stderr
  assert 'Traceback' not in proc.stderr
  assert sorted(p.name for p in out.rglob('*')) == before
  # --overwrite replaces our own earlier output (here with the 'train' half only).
  clip_benchmark_data.main(['--imagefolder', str(src), '--split', 'train', '--out', str(out),
                            '--overwrite'])
  with tarfile.open(out / 'test' / '0.tar') as tar:
    assert len([m for m in tar.getmembers() if m.name.endswith('.cls')]) == 2
