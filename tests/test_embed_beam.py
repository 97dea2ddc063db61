"""`python -m data_prep.embed_beam` writes the files of `python -m mofi_jax.embed` on the same
inputs, byte for byte: in-process (DirectRunner) on img2dataset tars with captions and a dead
record, resuming a shard that lost its done marker, and on Beam's portable runner (separate
SDK worker processes that load the model themselves) on a folder with bad images."""
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_prep import embed_beam
from portable_runner import ROOT, portable_services
from test_embed import (BATCH, files_of, photos, png_header_bomb, run,  # pylint: disable=unused-import
                        webdataset_tar)
from test_evaluate import encoder, loaded_once, tiny_run  # pylint: disable=unused-import  # fixtures


def test_plan_cuts_positions_into_the_local_commands_shards():
  counts = [(2, 0), (0, 5), (3, 7), (1, 1)]
  plan = embed_beam.plan_shards(counts, 4)
  # The reference: every position, unit by unit in order, numbered and cut by division.
  positions = [(u, k) for u, n in sorted(counts) for k in range(n)]
  expected = {}
  for p, (u, k) in enumerate(positions):
    expected.setdefault(p // 4, []).append((u, k))
  got = {s: [(u, k) for u, a, b in spans for k in range(a, b)] for s, spans in plan}
  assert got == expected and [s for s, _ in plan] == [0, 1, 2, 3]


def beam_run(out, *flags, source=None):
  argv = ['--workdir', source, '--out', str(out), '--batch_size', str(BATCH)] + list(flags)
  return embed_beam.main(argv)


def test_direct_runner_equals_the_local_command_and_resumes(photos, tiny_run, loaded_once,
                                                            tmp_path):
  shards = tmp_path / 'shards'
  shards.mkdir()
  webdataset_tar(shards / '00000.tar', photos)   # 10 records, one without image bytes
  webdataset_tar(shards / '00001.tar', photos)
  flags = ['--pairs', f'{shards}/*.tar', '--captions', '--shard_size', '6']
  local = run(tmp_path / 'local', *flags, source=tiny_run)
  beam = beam_run(tmp_path / 'beam', *flags, source=tiny_run)
  assert beam == local and local['num_shards'] == 4 and local['embedded'] == 18
  assert files_of(tmp_path / 'beam') == files_of(tmp_path / 'local')
  # A shard that lost its done marker is written again, and only that one.
  os.remove(tmp_path / 'beam' / 'done' / 'shard_2.json')
  os.remove(tmp_path / 'beam' / 'img_emb' / 'img_emb_2.npy')
  before = os.stat(tmp_path / 'beam' / 'img_emb' / 'img_emb_1.npy').st_mtime_ns
  beam_run(tmp_path / 'beam', *flags, source=tiny_run)
  assert files_of(tmp_path / 'beam') == files_of(tmp_path / 'local')
  assert os.stat(tmp_path / 'beam' / 'img_emb' / 'img_emb_1.npy').st_mtime_ns == before


def test_refuses_what_the_runner_cannot_share(tiny_run, tmp_path):
  with pytest.raises(SystemExit, match='--tfds: a TFDS split is one stream'):
    beam_run(tmp_path / 'e', '--tfds', 'x', '--data_dir', str(tmp_path), source=tiny_run)
  with pytest.raises(SystemExit, match='the runner shares the work'):
    beam_run(tmp_path / 'e', '--images', str(tmp_path), '--process_id', '0',
             '--num_processes', '2', source=tiny_run)


def test_portable_runner_equals_the_local_command(photos, tiny_run, loaded_once, tmp_path):
  folder = tmp_path / 'mixed'
  shutil.copytree(photos, folder)
  (folder / 'x_empty.jpg').write_bytes(b'')
  (folder / 'x_page.jpg').write_bytes(b'<!DOCTYPE html><html><body>404</body></html>')
  (folder / 'x_bomb.png').write_bytes(png_header_bomb(20000, 20000))
  flags = ['--images', str(folder), '--shard_size', '16']
  local = run(tmp_path / 'local', *flags, source=tiny_run)
  assert local['skipped_by_reason'] == {'empty_file': 1, 'image_too_large': 1,
                                        'unreadable_image': 1}
  with portable_services(str(tmp_path)) as beam_flags:
    argv = ['--workdir', tiny_run, '--out', str(tmp_path / 'beam'), '--batch_size', str(BATCH),
            *flags, *beam_flags]
    proc = subprocess.run([sys.executable, '-m', 'data_prep.embed_beam', *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'worker_pool.log') as f:
    assert 'Starting worker with command' in f.read()
  beam, local = files_of(tmp_path / 'beam'), files_of(tmp_path / 'local')
  assert sorted(beam) == sorted(local)
  # The workers' XLA runs on one CPU device and this process on eight, so the floats may
  # differ in the last bits; everything else is byte for byte.
  assert [k for k in local if beam[k] != local[k] and not k.endswith('.npy')] == []
  for k in (k for k in local if k.endswith('.npy')):
    np.testing.assert_allclose(*(np.load(io.BytesIO(x[k])).astype(np.float32)
                                 for x in (beam, local)), atol=2e-3)
