"""`python -m mofi_jax.embed` on the tiny corpus's held-out images with a tiny random model:
embeddings equal Encoder.embed_images of the same bytes, shards resume byte for byte after
kill -9, bad images are counted not fatal, processes split the shards, captions of a
WebDataset tar equal Encoder.embed_texts, and another run's --out is refused."""
import glob
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mofi_jax import embed
from test_evaluate import encoder, loaded_once, tiny_run  # pylint: disable=unused-import  # fixtures

BATCH = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def photos(tiny_corpus, tmp_path_factory):
  """The held-out images (50 JPEGs) spread over two nested folders, plus a text file."""
  root = tmp_path_factory.mktemp('photos')
  files = sorted(glob.glob(os.path.join(tiny_corpus, 'retrieval', '*.jpg')))
  for i, path in enumerate(files):
    folder = root / ('a' if i % 2 else 'b/c')
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, folder / os.path.basename(path))
  (root / 'notes.txt').write_text('not an input')
  return str(root)


def run(out, *flags, source=None):
  argv = ['--workdir', source, '--out', str(out), '--batch_size', str(BATCH)] + list(flags)
  return embed.main(argv)


def files_of(out):
  return {os.path.relpath(p, out): open(p, 'rb').read()
          for p in glob.glob(os.path.join(out, '**', '*'), recursive=True) if os.path.isfile(p)}


def shard_sizes(out):
  return [len(np.load(p)) for p in sorted(glob.glob(f'{out}/img_emb/*.npy'),
                                         key=lambda p: int(p.split('_')[-1][:-4]))]


def test_embeddings_equal_the_encoders_in_metadata_order(photos, tiny_run, encoder, loaded_once,
                                                         tmp_path):
  out = tmp_path / 'emb'
  stats = run(out, '--images', f'{photos}/**/*', '--shard_size', '16', source=tiny_run)
  assert stats['seen'] == stats['embedded'] == 50 and stats['complete']
  assert shard_sizes(out) == [16, 16, 16, 2]
  meta, rows = [], []
  for i in range(4):
    meta += pq.read_table(out / 'metadata' / f'metadata_{i}.parquet').to_pylist()
    rows.append(np.load(out / 'img_emb' / f'img_emb_{i}.npy'))
  paths = [m['image_path'] for m in meta]
  assert paths == sorted(glob.glob(f'{photos}/**/*.jpg', recursive=True))
  got = np.concatenate(rows)
  assert got.dtype == np.float16
  np.testing.assert_allclose(np.linalg.norm(got.astype(np.float32), axis=1), 1, atol=2e-3)
  expected = encoder.embed_images(encoder.preprocess([open(p, 'rb').read() for p in paths]))
  np.testing.assert_allclose(got.astype(np.float32), expected, atol=2e-3)
  assert [(m['width'], m['height']) for m in meta] == [Image.open(p).size for p in paths]
  info = json.loads((out / 'embed_info.json').read_text())
  assert info['dim'] == got.shape[1] and info['shard_size'] == 16
  assert info['preprocessing']['image_size'] == encoder.image_size


def test_kill_and_resume_gives_the_files_of_an_uninterrupted_run(photos, tiny_run, loaded_once,
                                                                 tmp_path):
  flags = ['--images', f'{photos}/**/*.jpg', '--shard_size', '4']
  run(tmp_path / 'whole', *flags, source=tiny_run)
  killed = tmp_path / 'killed'
  # Slowed after each batch so that the kill lands mid-run, after the first shard is done.
  code = ('import sys, time; from mofi_jax import embed; step = embed.embed_items; '
          'embed.embed_items = lambda *a: (step(*a), time.sleep(0.3))[0]; embed.main(sys.argv[1:])')
  argv = ['--workdir', tiny_run, '--out', str(killed), '--batch_size', str(BATCH)] + flags
  proc = subprocess.Popen([sys.executable, '-c', code] + argv, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  marker = killed / 'done' / 'shard_0.json'
  deadline = time.time() + 120
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert marker.exists() and not (killed / 'done' / 'shard_12.json').exists()
  run(killed, *flags, source=tiny_run)
  whole, resumed = files_of(tmp_path / 'whole'), files_of(killed)
  assert sorted(whole) == sorted(resumed)
  assert [k for k in whole if whole[k] != resumed[k]] == []


def png_header_bomb(width, height):
  """A valid PNG signature and IHDR declaring width x height, with no pixels behind it."""
  buf = io.BytesIO()
  Image.new('L', (1, 1)).save(buf, 'PNG')
  data = bytearray(buf.getvalue())
  ihdr = bytes(data[12:16]) + struct.pack('>II', width, height) + bytes(data[24:29])
  data[16:24] = struct.pack('>II', width, height)
  data[29:33] = struct.pack('>I', zlib.crc32(ihdr))
  return bytes(data)


def test_bad_images_are_skipped_and_counted(photos, tiny_run, loaded_once, tmp_path):
  folder = tmp_path / 'mixed'
  shutil.copytree(photos, folder)
  good = open(sorted(glob.glob(f'{photos}/a/*.jpg'))[0], 'rb').read()
  (folder / 'x_truncated.jpg').write_bytes(good[:len(good) // 2])
  (folder / 'x_empty.jpg').write_bytes(b'')
  (folder / 'x_page.jpg').write_bytes(b'<!DOCTYPE html><html><body>404</body></html>')
  (folder / 'x_bomb.png').write_bytes(png_header_bomb(20000, 20000))
  stats = run(tmp_path / 'emb', '--images', str(folder), '--shard_size', '16', source=tiny_run)
  assert stats['skipped_by_reason'] == {'empty_file': 1, 'image_too_large': 1,
                                        'unreadable_image': 2}
  assert stats['seen'] == 54 == stats['embedded'] + stats['skipped'] and stats['embedded'] == 50
  assert json.loads((tmp_path / 'emb' / 'stats.json').read_text()) == stats
  assert sum(shard_sizes(tmp_path / 'emb')) == 50


def test_two_processes_write_the_shards_of_one(photos, tiny_run, loaded_once, tmp_path):
  flags = ['--images', f'{photos}/**/*.jpg', '--shard_size', '8']
  run(tmp_path / 'one', *flags, source=tiny_run)
  first = run(tmp_path / 'two', *flags, '--process_id', '0', '--num_processes', '2',
              source=tiny_run)
  assert first['shards_done'] == 4 and not first['complete']
  assert sorted(os.listdir(tmp_path / 'two' / 'done')) == [f'shard_{i}.json' for i in (0, 2, 4, 6)]
  run(tmp_path / 'two', *flags, '--process_id', '1', '--num_processes', '2', source=tiny_run)
  assert files_of(tmp_path / 'one') == files_of(tmp_path / 'two')


def webdataset_tar(path, photos):
  """img2dataset's layout: {key}.jpg, {key}.txt, {key}.json with the url; one 0-byte image."""
  files = sorted(glob.glob(f'{photos}/**/*.jpg', recursive=True))[:10]
  with tarfile.open(path, 'w') as tar:
    for i, image in enumerate(files):
      key = f'{i:09d}'
      members = {'jpg': b'' if i == 3 else open(image, 'rb').read(),
                 'txt': f'photo number {i}'.encode(),
                 'json': json.dumps({'url': f'https://example.com/{i}.jpg'}).encode()}
      for ext, data in members.items():
        info = tarfile.TarInfo(f'{key}.{ext}')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return files


def test_pairs_with_captions(photos, tiny_run, encoder, loaded_once, tmp_path):
  shards = tmp_path / 'shards'
  shards.mkdir()
  webdataset_tar(shards / '00000.tar', photos)
  out = tmp_path / 'emb'
  stats = run(out, '--pairs', f'{shards}/*.tar', '--captions', source=tiny_run)
  assert stats['embedded'] == 9 and stats['skipped_by_reason'] == {'missing_field': 1}
  meta = pq.read_table(out / 'metadata' / 'metadata_0.parquet').to_pylist()
  captions = [m['caption'] for m in meta]
  assert captions == [f'photo number {i}' for i in range(10) if i != 3]
  assert [m['url'] for m in meta] == [f'https://example.com/{i}.jpg' for i in range(10) if i != 3]
  assert meta[0]['key'] == 'shards/000000000'
  texts = np.load(out / 'text_emb' / 'text_emb_0.npy').astype(np.float32)
  np.testing.assert_allclose(texts, encoder.embed_texts(captions), atol=2e-3)


def test_other_arguments_on_an_existing_out_are_refused(photos, tiny_run, loaded_once, tmp_path,
                                                       capsys):
  out = tmp_path / 'emb'
  flags = ['--images', f'{photos}/a/*.jpg']
  run(out, *flags, '--shard_size', '8', source=tiny_run)
  before = files_of(out)
  with pytest.raises(SystemExit) as exit_info:
    run(out, *flags, '--shard_size', '16', source=tiny_run)
  message = str(exit_info.value.code)
  assert message.startswith('mofi_jax.embed: error:') and '\n' not in message
  assert 'shard_size was 8, now 16' in message
  assert files_of(out) == before
  stats = run(out, *flags, '--shard_size', '16', '--overwrite', source=tiny_run)
  assert shard_sizes(out) == [16, 9] and stats['embedded'] == 25
  with pytest.raises(SystemExit, match='lies inside --images'):
    run(os.path.join(photos, 'a', 'emb'), '--images', photos, source=tiny_run)
  capsys.readouterr()


def test_tfds_split_in_order(tiny_run, encoder, loaded_once, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  data_dir = tmp_path / 'tfds'
  data_dir.mkdir()
  (data_dir / 'placeholder').write_text('')   # the mock needs no files; the reader, some
  out = tmp_path / 'emb'
  with tfds.testing.mock_data(num_examples=7):
    stats = run(out, '--tfds', 'oxford_iiit_pet', '--data_dir', str(data_dir), '--split',
                'test', '--shard_size', '5', source=tiny_run)
    # The mock draws its random examples from the features read, so read the same one.
    decoders = tfds.decode.PartialDecoding({'image': True},
                                           decoders={'image': tfds.decode.SkipDecoding()})
    images = [ex['image'] for ex in tfds.as_numpy(tfds.load(
        'oxford_iiit_pet', split='test', data_dir=str(data_dir), decoders=decoders))]
  assert stats['embedded'] == 7 and shard_sizes(out) == [5, 2]
  got = np.concatenate([np.load(out / 'img_emb' / f'img_emb_{i}.npy') for i in (0, 1)])
  np.testing.assert_allclose(got.astype(np.float32),
                             encoder.embed_images(encoder.preprocess(images)), atol=2e-3)
  keys = pq.read_table(out / 'metadata' / 'metadata_1.parquet').column('key').to_pylist()
  assert keys == ['oxford_iiit_pet/test/5', 'oxford_iiit_pet/test/6']
