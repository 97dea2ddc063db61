"""`python -m mofi_jax.export` on a real (tiny) training checkpoint: the HF folder
loads with AutoModel and matches our embeddings and head; it imports back to the
same parameters; output folders are never half-written or overwritten."""
import io
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from PIL import Image

from configs import demo
from mofi_jax import export, inference, losses, run_setup, sharding, trainer
from mofi_jax.interop import clip_params, hf_export, hf_import
from test_interop_hf import hf_features, jax_features, random_params
from test_mofi_transform import torchvision_transform

STEP = 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_workdir(tiny_corpus, wd, head_kind='linear'):
  """A workdir as train.py leaves it: config.json and an Orbax checkpoint, of a
  multitask ViT (patch 14, scanned layers) with random weights everywhere."""
  config = demo.get_config('multitask')
  config.input.update(data_dir=str(tiny_corpus), image_size=28, text_len=12)
  config.model.update(embed_dim=24, scan=True)
  config.model.head.kind = head_kind
  config.model.image = dict(variant=None, width=32, depth=2, num_heads=4, mlp_dim=64,
                            patch=14, pool='cls', act='quick_gelu', ln_pre=True)
  config.model.text = dict(vocab_size=-1, context=12, width=32, depth=2, num_heads=4,
                           mlp_dim=64, act='gelu')
  config = run_setup.resolve_from_corpus(config, str(tiny_corpus))
  inference.write_config(wd, config, str(tiny_corpus))
  mesh = sharding.make_mesh(config.mesh)
  setup = trainer.build(config, mesh)
  state = setup.init(mesh, 0)
  params = jax.device_put(random_params(config, seed=7), setup.shardings.params)
  mngr = ocp.CheckpointManager(os.path.join(wd, 'checkpoints'), item_names=('state', 'meta'))
  mngr.save(STEP, args=ocp.args.Composite(state=ocp.args.StandardSave(
      state.replace(params=params)), meta=ocp.args.JsonSave({'step': STEP})))
  mngr.wait_until_finished()
  mngr.close()
  return wd


@pytest.fixture(scope='module')
def workdir(tiny_corpus, tmp_path_factory):
  return make_workdir(tiny_corpus, str(tmp_path_factory.mktemp('export') / 'run'))


@pytest.fixture(scope='module')
def encoder(workdir):
  return inference.load(workdir)


@pytest.fixture(scope='module')
def hf_out(workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('hf') / 'exported')
  assert export.main(['--workdir', workdir, '--format', 'hf', '--out', out]) == out
  return out


def png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def random_pngs(n, shape, seed=0):
  rng = np.random.default_rng(seed)
  return [png(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(n)]


def texts_of(encoder, n=6):
  ents = encoder.entities
  return [f'{ents.names[i]}, {ents.descriptions[i]}' for i in range(n)]


def test_export_loads_with_automodel_and_matches_our_embeddings(hf_out, encoder):
  model = transformers.AutoModel.from_pretrained(hf_out).eval()
  assert type(model) is transformers.CLIPModel
  texts = texts_of(encoder)
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf_out)
  vocab = encoder.config.model.text.vocab_size
  text_config = model.config.text_config
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
      text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id) == (
          1, vocab - 1, 0)
  ids = hf_tok(texts, padding='max_length', max_length=12, truncation=True)['input_ids']
  ours_ids = encoder.tokenize(texts)
  swapped = np.where(ours_ids == 2, vocab - 1, np.where(ours_ids == vocab - 1, 2, ours_ids))
  np.testing.assert_array_equal(ids, swapped)

  pixels = encoder.preprocess(random_pngs(4, (40, 31, 3)))
  img_ours, txt_ours = encoder.embed_images(pixels), encoder.embed_texts(texts)
  img_hf, txt_hf = hf_features(model, pixels), hf_features(model, ids=ids)
  np.testing.assert_allclose(img_hf, jax_features(encoder.config, encoder.params, pixels),
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(losses.l2_normalize(img_hf), img_ours, atol=1e-4, rtol=0)
  np.testing.assert_allclose(losses.l2_normalize(txt_hf), txt_ours, atol=1e-4, rtol=0)
  # Image-image and text-image similarities, HF's from its own forward pass.
  np.testing.assert_allclose(losses.l2_normalize(img_hf) @ losses.l2_normalize(img_hf).T,
                             img_ours @ img_ours.T, atol=1e-5, rtol=0)
  with torch.no_grad():
    logits = model(input_ids=torch.as_tensor(ids), pixel_values=torch.from_numpy(
        pixels.transpose(0, 3, 1, 2).copy())).logits_per_text.numpy()
  np.testing.assert_allclose(logits, encoder.logit_scale() * txt_ours @ img_ours.T,
                             atol=2e-3, rtol=0)
  assert np.ptp(logits) > 0.1   # not a constant matrix


def test_ml_mofis_recipe_on_our_export_gives_our_embeddings(hf_out, encoder):
  """apple/ml-mofi's README, followed on our folder: AutoModel + AutoTokenizer, texts with
  padding=True and no attention mask, images through get_mofi_transform (at the export's
  28 px)."""
  model = transformers.AutoModel.from_pretrained(hf_out).eval()
  tok = transformers.AutoTokenizer.from_pretrained(hf_out)
  texts = [encoder.entities.names[i] for i in range(6)] + ['a photo of a cat']
  ids = tok(texts, return_tensors='pt', padding=True, return_attention_mask=False)['input_ids']
  assert ids.shape[1] < 12 and len(set(map(len, tok(texts)['input_ids']))) > 1   # padded
  with torch.no_grad():
    txt = model.get_text_features(input_ids=ids).pooler_output
  np.testing.assert_allclose(losses.l2_normalize(txt.numpy()), encoder.embed_texts(texts),
                             atol=1e-6, rtol=0)
  images = random_pngs(2, (40, 31, 3)) + random_pngs(1, (17, 90, 3), seed=1)
  transform = torchvision_transform(resize=28, crop=28)
  with torch.no_grad():
    pixels = torch.stack([transform(Image.open(io.BytesIO(b)).convert('RGB')) for b in images])
    img = model.get_image_features(pixels).pooler_output.numpy()
  ours = encoder.embed_images(encoder.preprocess(images, method='mofi'))
  np.testing.assert_allclose(losses.l2_normalize(img), ours, atol=1e-5, rtol=0)


def test_preprocessor_config_gives_our_pixels(hf_out, encoder, tmp_path):
  # At the model's size no resampling happens, so both pipelines must agree to
  # float precision (rescale, crop and normalisation are exactly specified).
  image = random_pngs(1, (28, 28, 3), seed=3)[0]
  processor = transformers.AutoImageProcessor.from_pretrained(hf_out)
  theirs = processor(images=[Image.open(io.BytesIO(image))], return_tensors='np')
  np.testing.assert_allclose(theirs['pixel_values'].transpose(0, 2, 3, 1),
                             encoder.preprocess([image]), atol=1e-5, rtol=0)


def test_documented_entity_head_snippet_matches_our_head(hf_out, encoder, tmp_path):
  doc = hf_export.__doc__
  code = textwrap.dedent(doc[doc.index('    import json'):])
  with open(os.path.join(ROOT, 'docs', 'interop.md')) as f:
    assert code in f.read(), 'docs/interop.md must show the same snippet'
  path = str(tmp_path / 'image.png')
  with open(path, 'wb') as f:
    f.write(random_pngs(1, (50, 37, 3), seed=4)[0])
  namespace = {'OUT': hf_out, 'path': path}
  exec(compile(code, 'hf_export snippet', 'exec'), namespace)  # pylint: disable=exec-used

  pixels = namespace['inputs']['pixel_values'].numpy().transpose(0, 2, 3, 1)
  head = jax.device_get(encoder.params['entity_head'])
  c = encoder.config.model.head.num_classes
  want = (jax_features(encoder.config, encoder.params, pixels) @ head['kernel'][:, :c]
          + head['bias'][:c])
  np.testing.assert_allclose(namespace['logits'].numpy(), want, atol=1e-4, rtol=0)
  assert len(namespace['entities']) == c


def test_export_imports_back_to_the_same_parameters(hf_out, encoder):
  back = hf_import.load_encoder(hf_out)
  assert back.config.model.mode == 'multitask'
  # Ours has scanned layers, the import unrolled ones: compare tensor by tensor.
  ours = clip_params.to_hf(jax.device_get(encoder.params), encoder.config.model)
  theirs = clip_params.to_hf(jax.device_get(back.params), back.config.model)
  assert set(ours) == set(theirs)
  vocab = encoder.config.model.text.vocab_size
  for name, x in ours.items():
    y = theirs[name]
    if name == 'text_model.embeddings.token_embedding.weight':
      y = y[np.r_[0:2, vocab - 1, 3:vocab - 1, 2]]   # undo the <eot> id swap
    np.testing.assert_array_equal(y, x, err_msg=name)
  texts = texts_of(encoder)
  np.testing.assert_allclose(back.embed_texts(texts), encoder.embed_texts(texts),
                             atol=1e-6, rtol=0)
  for got, want in zip(back.head_weights(), encoder.head_weights()):
    np.testing.assert_array_equal(got, want)
  assert back.entities.ids == encoder.entities.ids


def _listing(folder):
  return {n: os.path.getsize(os.path.join(folder, n)) for n in sorted(os.listdir(folder))}


def test_cli_refuses_a_non_empty_out_in_one_line(workdir, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('precious')
  proc = subprocess.run(
      [sys.executable, '-m', 'mofi_jax.export', '--workdir', workdir, '--format', 'hf',
       '--out', str(out)], capture_output=True, text=True, cwd=ROOT, check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3'))
  assert proc.returncode != 0
  errors = [l for l in proc.stderr.splitlines() if l.startswith('mofi_jax.export')]
  assert errors == [f'mofi_jax.export: error: --out {out}: folder is not empty; choose another '
                    'folder or pass --overwrite to replace it once the new output is complete.']
  assert 'Traceback' not in proc.stderr
  assert _listing(out) == {'keep.txt': 8}


def test_failed_overwrite_keeps_the_old_folder_and_a_good_one_replaces_it(
    workdir, hf_out, tmp_path):
  out = str(tmp_path / 'copy')
  export.main(['--workdir', workdir, '--format', 'hf', '--out', out])
  before = _listing(out)
  with pytest.raises(SystemExit, match=r'no checkpoint for step 999; available steps: \[5\]'):
    export.main(['--workdir', workdir, '--step', '999', '--format', 'hf', '--out', out,
                 '--overwrite'])
  assert _listing(out) == before
  with open(os.path.join(out, 'config.json'), 'a') as f:
    f.write(' ')
  export.main(['--workdir', workdir, '--step', str(STEP), '--format', 'hf', '--out', out,
               '--overwrite'])
  assert _listing(out) == before == _listing(hf_out)
  assert sorted(os.listdir(tmp_path)) == ['copy']   # no temporary folders left
  with open(os.path.join(out, hf_export.INFO_FILE)) as f:
    assert json.load(f)['step'] == STEP


def test_overwrite_never_replaces_the_workdir_its_corpus_or_a_foreign_folder(workdir, tmp_path):
  """--overwrite replaces an earlier export only: not the workdir (W became the HF folder
  before), nor a folder that contains it, nor a non-export folder, nor through a link."""
  before = _listing(workdir)
  home = tmp_path / 'home'
  home.mkdir()
  (home / 'thesis.tex').write_text('years of work')
  os.symlink(tmp_path / 'home', tmp_path / 'link')
  corpus = inference.read_config(workdir).input.data_dir
  for out, message in [
      (workdir, 'is the same folder as --workdir'),
      (os.path.dirname(workdir), 'contains --workdir'),
      (os.path.join(workdir, 'hf'), 'lies inside --workdir'),
      (str(home), 'replaces only an earlier output of mofi_jax.export'),
      (str(tmp_path / 'link'), 'is a symbolic link'),
      (os.path.join(corpus, 'hf'), 'lies inside the corpus'),
  ]:
    with pytest.raises(SystemExit, match=message):
      export.main(['--workdir', workdir, '--format', 'hf', '--out', out, '--overwrite'])
  assert _listing(workdir) == before
  assert os.listdir(home) == ['thesis.tex'] and sorted(os.listdir(tmp_path)) == ['home', 'link']


def test_an_existing_empty_out_is_filled(workdir, hf_out, tmp_path):
  out = tmp_path / 'made_by_mkdir'
  out.mkdir()
  export.main(['--workdir', workdir, '--format', 'hf', '--out', str(out)])
  assert _listing(str(out)) == _listing(hf_out)
  assert sorted(os.listdir(tmp_path)) == ['made_by_mkdir']   # no .old-* or .tmp-* left


def test_a_cosine_head_exports_what_its_loss_trains(tiny_corpus, tmp_path):
  """The cosine EntityHead in a model: the exported kernel and scale, applied in float64
  NumPy (scale x cosine of the raw embedding and each column), give the loss our sharded
  entity loss computes from the model's own head output on the same embeddings."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  wd = make_workdir(tiny_corpus, str(tmp_path / 'cosine'), head_kind='cosine')
  out = export.main(['--workdir', wd, '--format', 'hf', '--out', str(tmp_path / 'hf')])
  head = load_file(os.path.join(out, hf_export.HEAD_FILE))
  enc = inference.load(wd)
  assert enc.config.model.head.kind == 'cosine' and 'bias' not in head
  images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert('RGB'), np.float32) / 255
                     for b in random_pngs(6, (28, 28, 3), seed=3)])
  raw = enc.embed_images((images - 0.45) / 0.27, normalize=False).astype(np.float64)
  kernel = head['kernel'].astype(np.float64)
  logits = float(head['scale']) * (raw / np.linalg.norm(raw, axis=1, keepdims=True)) @ (
      kernel / np.linalg.norm(kernel, axis=0, keepdims=True))
  labels = np.array([[i % kernel.shape[1], -1] for i in range(6)], np.int32)
  lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  expected = np.mean(lse - logits[np.arange(6), labels[:, 0]])
  params = enc.params['entity_head']
  mesh = sharding.make_mesh(enc.config.mesh, jax.devices()[:1])
  got = losses.entity_xent_sharded(
      raw.astype(np.float32), np.asarray(params['kernel']), None, labels,
      (labels >= 0).astype(np.float32), num_classes=kernel.shape[1], mesh=mesh,
      scale=np.float32(np.exp(float(params['log_scale']))), normalize_kernel=True,
      tile_size=64, dtype=np.float32)
  assert float(got) == pytest.approx(expected, rel=1e-5)
  assert float(head['scale']) == pytest.approx(np.exp(float(params['log_scale'])), rel=1e-6)


def test_savedmodel_from_the_command_line_equals_jax(workdir, encoder, tmp_path):
  """`export --format savedmodel --platforms cpu` as a user runs it: the loaded SavedModel's
  signatures give our JAX features, and the platforms flag reached the file."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from mofi_jax.interop import savedmodel  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / 'sm')
  proc = subprocess.run(
      [sys.executable, '-m', 'mofi_jax.export', '--workdir', workdir, '--format',
       'savedmodel', '--out', out, '--platforms', 'cpu'], capture_output=True, text=True,
      cwd=ROOT, check=False, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == out
  with open(os.path.join(out, savedmodel.INFO_FILE)) as f:
    assert json.load(f)['platforms'] == ['cpu']
  loaded = tf.saved_model.load(out)
  rng = np.random.default_rng(9)
  images = rng.normal(size=(3, 28, 28, 3)).astype(np.float32)
  got = loaded.signatures['embed_images'](images=tf.constant(images))
  np.testing.assert_allclose(got['features'].numpy(),
                             jax_features(encoder.config, encoder.params, images),
                             atol=1e-5, rtol=0)
  tokens = encoder.tokenize(texts_of(encoder, 3))
  got = loaded.signatures['embed_tokens'](tokens=tf.constant(tokens))
  np.testing.assert_allclose(got['features'].numpy(),
                             jax_features(encoder.config, encoder.params, tokens=tokens),
                             atol=1e-5, rtol=0)
