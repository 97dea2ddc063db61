r"""Search benchmarks (issue 33, part 6): index build, API latency, embed throughput, and the
1B-image extrapolation. Figures are printed; --json OUT keeps them.

  python benchmarks/retrieval.py --only index --rows 1000000 [--max_memory 2GB]
  python benchmarks/retrieval.py --only api [--seconds 100] [--clients 8] [--api_index I]
  python benchmarks/retrieval.py --only index --only api --rows 1000000   # API over 1M rows
  python benchmarks/retrieval.py --only embed [--images 256] [--embed_workdir W]
  python benchmarks/retrieval.py --only extrapolate [--target_rows 1e9 --shard_rows 1e8]
  python benchmarks/retrieval.py --json out.json          # all four

index: `--rows` random-projection vectors of dimension 512 (a Gaussian latent of dimension 64
projected to 512, plus noise of 0.1 per coordinate relative to the projection's scale,
L2-normalised, float16), written by mofi_jax.embed_shards' own writer in clip-retrieval's
layout (shards of 100,000 rows, stats.json complete), then `python -m mofi_jax.index` as a
subprocess: wall time, the subprocess's peak RSS (getrusage RUSAGE_CHILDREN), and the
factory, search_params and recall@10 of index_info.json.

api: a tiny random transformers CLIP folder (tests/test_interop_hf.write_hf_folder) serving
`--api_index`, or the index part's index when it ran first in the same command (the tiny
model then embeds to that index's dimension), else 400 generated JPEGs embedded by
`python -m mofi_jax.embed --hf_clip` and indexed; `python -m mofi_jax.serve` is queried by
`--clients` threads (httpx) posting text and image queries for `--seconds`; p50/p99 of
each kind.

embed: a training workdir (`--embed_workdir`, e.g. the trained demo model), or a B/16 CLIP
with random weights (vision 768 wide, 12 layers, 12 heads, patch 16, 224
px; text tower transformers' default), saved by transformers, run by
`python -m mofi_jax.embed --hf_clip` over `--images` generated 640x480 JPEGs; images/s and
per CPU core (os.cpu_count()), the model load and compile included in the wall time and
excluded in the steady figure (a run over 32 images first, subtracted).
"""
import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))
SHARD_ROWS = 100_000
ENV = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))


def write_random_projection(out, rows, dim=512, latent=64, noise=0.1, seed=0):
  """clip-retrieval's layout through embed_shards' writer; returns seconds taken."""
  from mofi_jax import embed_shards  # pylint: disable=import-outside-toplevel
  started = time.time()
  rng = np.random.default_rng(seed)
  proj = rng.normal(size=(latent, dim)).astype(np.float32) / np.sqrt(latent)
  shards = math.ceil(rows / SHARD_ROWS)
  embed_shards.open_output(out, dict(benchmark='retrieval.py random projection', rows=rows,
                                     dim=dim, latent=latent, noise=noise, seed=seed),
                           False, [])
  for shard in range(shards):
    n = min(SHARD_ROWS, rows - shard * SHARD_ROWS)
    x = rng.normal(size=(n, latent)).astype(np.float32) @ proj
    x += noise * rng.normal(size=x.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    first = shard * SHARD_ROWS
    meta = [dict(image_path=f'/photos/{r:08d}.jpg', key=f'{r:08d}', url=None, caption=None,
                 width=640, height=480) for r in range(first, first + n)]
    embed_shards.write_shard(out, shard, x, None, meta, dict(seen=n, embedded=n, skipped={}))
  embed_shards.write_stats(out, shards)
  return time.time() - started


def run_child(cmd, log):
  """(wall seconds, the peak RSS in bytes of the longest-lived child so far)."""
  started = time.time()
  with open(log, 'wb') as f:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, check=False)
  wall = time.time() - started
  if proc.returncode:
    raise RuntimeError(f'{" ".join(cmd)} exited {proc.returncode}; see {log}')
  return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def bench_index(args, work):
  emb, out = os.path.join(work, 'emb'), os.path.join(work, 'index')
  write_s = write_random_projection(emb, args.rows)
  cmd = [sys.executable, '-m', 'mofi_jax.index', '--embeddings', emb, '--out', out,
         '--max_memory', args.max_memory]
  wall, rss = run_child(cmd, os.path.join(work, 'index.log'))
  with open(os.path.join(out, 'index_info.json'), encoding='utf-8') as f:
    info = json.load(f)
  size = os.path.getsize(os.path.join(out, 'index.faiss')) if os.path.exists(
      os.path.join(out, 'index.faiss')) else None
  curve, latency = query_figures(emb, out, info) if args.query_figures else (None, None)
  return dict(rows=args.rows, dim=512, max_memory=args.max_memory, write_seconds=round(write_s, 1),
              recall_curve=curve, query_latency=latency,
              command=' '.join(cmd[1:]), build_wall_seconds=round(wall, 1),
              build_seconds_stored=info['build_seconds'], peak_rss_bytes=rss,
              peak_rss_gib=round(rss / 2**30, 3), factory=info['factory'],
              search_params=info['search_params'], recall_at_10=info['recall_at_10'],
              index_file_bytes=size,
              targets=dict(build_seconds=600, peak_rss_gib=2.0, recall_at_10=0.95))


IVF_SETTINGS = ('nprobe=64', 'nprobe=256', 'nprobe=1024')
HNSW_SETTINGS = ('efSearch=32', 'efSearch=64', 'efSearch=128', 'efSearch=256')


def query_figures(emb, out, info, k_factor=16, timed=200):
  """recall@10 at cheaper settings than the stored one (the same queries and exact top-10 as
  the build), and the index's own search time per query, one query at a time, at each."""
  import faiss  # pylint: disable=import-outside-toplevel
  from mofi_jax import index as index_cli  # pylint: disable=import-outside-toplevel
  index = faiss.read_index(os.path.join(out, 'index.faiss'))
  shards, _, _ = index_cli.read_collection(emb)
  rows = np.load(os.path.join(out, 'recall_queries.npy'))
  queries = index_cli.gather_rows(shards, rows)
  exact = index_cli.exact_neighbours(shards, queries, rows, index_cli.RECALL_K)
  refine = 'Refine' in info['factory']
  settings = HNSW_SETTINGS if info['factory'].startswith('HNSW') else IVF_SETTINGS
  space, curve, latency = faiss.ParameterSpace(), {}, {}
  stored = info['search_params']
  for params in [p + (f',k_factor_rf={k_factor}' if refine else '') for p in settings] + [stored]:
    if not params:
      continue
    space.set_index_parameters(index, params)
    curve[params] = index_cli.recall_at_k(index, queries, rows, exact)
    for threads in (1, os.cpu_count()):
      faiss.omp_set_num_threads(threads)
      t0 = time.perf_counter()
      for q in queries[:timed]:
        index.search(q[None], index_cli.RECALL_K + 1)
      latency[f'{params} threads={threads}'] = round(1000 * (time.perf_counter() - t0) / timed, 2)
  return curve, latency


def write_jpegs(folder, count, size=(640, 480), seed=0):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):   # smooth colour fields plus noise: JPEG sizes like photos'
    base = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, size=(size[1], size[0], 3))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f'img_{i:05d}.jpg'), quality=90)


def tiny_clip(folder, projection_dim=16):
  """A tiny random CLIP (vision 48 wide, 2 layers, 32 px; text 32 wide); projection_dim: its
  embedding width, to query an index of that dimension."""
  import test_interop_hf as hf  # pylint: disable=import-outside-toplevel
  hf.write_hf_folder(folder, False, hf.IMAGENET_MEAN, hf.IMAGENET_STD, 16, 32, 48, 'gelu',
                     projection_dim=projection_dim)


def b16_clip(folder):
  import test_interop_hf as hf  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  hf_tok = hf.clip_style_tokenizer(folder)
  cfg = transformers.CLIPConfig(
      projection_dim=512,
      text_config=dict(vocab_size=len(hf_tok), max_position_embeddings=12,
                       eos_token_id=hf_tok.eos_token_id, bos_token_id=hf_tok.bos_token_id,
                       pad_token_id=1),
      vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, patch_size=16, image_size=224))
  hf.save_random_clip(folder, cfg, 0)
  with open(os.path.join(folder, 'preprocessor_config.json'), 'w', encoding='utf-8') as f:
    json.dump(dict(image_processor_type='CLIPImageProcessor', do_resize=True,
                   size=dict(shortest_edge=224), do_center_crop=True,
                   crop_size=dict(height=224, width=224), do_rescale=True,
                   rescale_factor=1 / 255, do_normalize=True, image_mean=list(hf.IMAGENET_MEAN),
                   image_std=list(hf.IMAGENET_STD)), f)


def percentiles(ms):
  ms = np.asarray(ms)
  return dict(n=len(ms), p50_ms=round(float(np.percentile(ms, 50)), 2),
              p99_ms=round(float(np.percentile(ms, 99)), 2), mean_ms=round(float(ms.mean()), 2))


def bench_api(args, work):
  import httpx  # pylint: disable=import-outside-toplevel
  from portable_runner import free_port  # pylint: disable=import-outside-toplevel
  model, photos = os.path.join(work, 'clip'), os.path.join(work, 'photos')
  write_jpegs(photos, args.api_images, size=(160, 120))
  if args.api_index:   # the index part's 1M rows, queried with a 512-d tiny model
    with open(os.path.join(args.api_index, 'index_info.json'), encoding='utf-8') as f:
      api_info = json.load(f)
    tiny_clip(model, api_info['dim'])
    index = args.api_index
  else:
    tiny_clip(model)
    emb, index = os.path.join(work, 'emb'), os.path.join(work, 'index')
    run_child([sys.executable, '-m', 'mofi_jax.embed', '--hf_clip', model, '--images', photos,
               '--out', emb], os.path.join(work, 'embed.log'))
    run_child([sys.executable, '-m', 'mofi_jax.index', '--embeddings', emb, '--out', index],
              os.path.join(work, 'index.log'))
    with open(os.path.join(index, 'index_info.json'), encoding='utf-8') as f:
      api_info = json.load(f)
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  log = open(os.path.join(work, 'serve.log'), 'wb')  # pylint: disable=consider-using-with
  proc = subprocess.Popen([sys.executable, '-m', 'mofi_jax.serve', '--index', index, '--hf_clip',
                           model, '--port', str(port)], cwd=ROOT, env=ENV, stdout=log,
                          stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 300
    while True:
      try:
        if httpx.get(f'{url}/health', timeout=2).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      if proc.poll() is not None or time.time() > deadline:
        raise RuntimeError(f'serve did not start; see {work}/serve.log')
      time.sleep(0.5)
    query_image = open(os.path.join(photos, 'img_00000.jpg'), 'rb').read()  # pylint: disable=consider-using-with
    words = ['a red photo', 'the sea at night', 'a cat on a chair', 'mountains', 'a city street']
    results = dict(text=[], image=[])
    lock, stop_at = threading.Lock(), time.time() + args.seconds
    errors = []

    def client(i):
      with httpx.Client(base_url=url, timeout=30) as c:
        j = 0
        while time.time() < stop_at:
          kind = 'text' if (i + j) % 2 == 0 else 'image'
          t0 = time.perf_counter()
          if kind == 'text':
            r = c.post('/search', data=dict(text=words[j % len(words)], k='10'))
          else:
            r = c.post('/search', files=dict(image=('q.jpg', query_image, 'image/jpeg')),
                       data=dict(k='10'))
          ms = 1000 * (time.perf_counter() - t0)
          with lock:
            (results[kind] if r.status_code == 200 else errors).append(
                ms if r.status_code == 200 else r.status_code)
          j += 1

    with httpx.Client(base_url=url, timeout=30) as c:   # one of each before timing
      assert c.post('/search', data=dict(text='warm up', k='10')).status_code == 200
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
      list(pool.map(client, range(args.clients)))
  finally:
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
  total = len(results['text']) + len(results['image'])
  return dict(clients=args.clients, seconds=args.seconds, rows=api_info['rows'],
              factory=api_info['factory'], search_params=api_info['search_params'],
              recall_at_10=api_info['recall_at_10'],
              model='tiny random CLIP (vision 48 wide, 2 layers, 32 px; text 32 wide)',
              text=percentiles(results['text']), image=percentiles(results['image']),
              all=percentiles(results['text'] + results['image']),
              queries_per_second=round(total / args.seconds, 1), errors=len(errors),
              targets=dict(p50_ms=20, p99_ms=100))


def bench_embed(args, work):
  model, photos = os.path.join(work, 'b16'), os.path.join(work, 'photos')
  t0 = time.time()
  if args.embed_workdir:
    model_flag, name = ['--workdir', args.embed_workdir], f'workdir {args.embed_workdir}'
  else:
    b16_clip(model)
    model_flag, name = ['--hf_clip', model], 'B/16 random (HF CLIPModel, vision 768/12/12 patch 16, 224 px)'
  setup = time.time() - t0
  write_jpegs(photos, args.images)
  warm_dir = os.path.join(work, 'photos_warm')
  os.makedirs(warm_dir)
  for file_name in sorted(os.listdir(photos))[:32]:
    os.symlink(os.path.join(photos, file_name), os.path.join(warm_dir, file_name))
  base = [sys.executable, '-m', 'mofi_jax.embed', *model_flag, '--batch_size', '32']
  warm, _ = run_child(base + ['--images', warm_dir, '--out', os.path.join(work, 'e32')],
                      os.path.join(work, 'embed32.log'))
  wall, _ = run_child(base + ['--images', photos, '--out', os.path.join(work, 'eall')],
                      os.path.join(work, 'embed.log'))
  cores = os.cpu_count()
  steady = (args.images - 32) / max(wall - warm, 1e-9)
  return dict(model=name, images=args.images, image_size='640x480 JPEG', cores=cores,
              model_setup_seconds=round(setup, 1), wall_seconds=round(wall, 1),
              wall_32_images_seconds=round(warm, 1),
              images_per_second_wall=round(args.images / wall, 2),
              images_per_second_steady=round(steady, 2),
              images_per_second_per_core_steady=round(steady / cores, 2),
              command=' '.join(base[1:] + ['--images', 'PHOTOS', '--out', 'OUT']))


def extrapolate(args, measured=None):
  """IVF-PQ + Refine(SQ8) shards for target_rows, from mofi_jax.index's own rule."""
  from mofi_jax import index as index_cli  # pylint: disable=import-outside-toplevel
  d, n, per = 512, int(args.target_rows), int(args.shard_rows)
  shards = math.ceil(n / per)
  k = index_cli.ivf_lists(per)
  lines, out = [], dict(target_rows=n, shard_rows=per, shards=shards, dim=d, nlist=k)
  for m in (16, 32, 64):
    row = m + d + 8   # PQ code, SQ8 refine code, 8-byte id
    shard_bytes = per * row + 4 * k * d
    budget = shard_bytes / index_cli.HEADROOM   # the --max_memory that chooses it
    out[f'PQ{m}'] = dict(bytes_per_row=row, shard_gib=round(shard_bytes / 2**30, 2),
                         max_memory_gib=round(budget / 2**30, 2),
                         total_gib=round(shards * shard_bytes / 2**30, 1),
                         factory=index_cli.choose_factory(per, d, math.ceil(budget)))
    lines.append(f'  PQ{m}: {per:,} x ({m} + {d} + 8) B + 4 x {k} x {d} B centroids = '
                 f'{shard_bytes / 2**30:.2f} GiB a shard; x {shards} = '
                 f'{shards * shard_bytes / 2**30:.0f} GiB; shards per 256 GiB host: '
                 f'{int(256 * 2**30 // shard_bytes)}')
  if measured:
    per_row_s = measured['build_wall_seconds'] / measured['rows']
    out['build_hours_per_shard_linear'] = round(per_row_s * per / 3600, 2)
    lines.append(f'  build, linear in rows from {measured["rows"]:,} in '
                 f'{measured["build_wall_seconds"]} s: {per_row_s * per / 3600:.1f} h a shard '
                 f'on these 2 cores, {per_row_s * n / 3600:.0f} core-pair hours for all')
  out['arithmetic'] = lines
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--only', choices=('index', 'api', 'embed', 'extrapolate'), action='append')
  parser.add_argument('--rows', type=int, default=1_000_000)
  parser.add_argument('--max_memory', default='2GB')
  parser.add_argument('--seconds', type=float, default=100)
  parser.add_argument('--clients', type=int, default=8)
  parser.add_argument('--api_images', type=int, default=400)
  parser.add_argument('--api_index', help='api: serve this index (default: the index part\'s, '
                      'when it runs first; else 400 images embedded by the tiny model)')
  parser.add_argument('--embed_workdir', help='embed: a training workdir instead of the B/16')
  parser.add_argument('--images', type=int, default=256)
  parser.add_argument('--target_rows', type=float, default=1e9)
  parser.add_argument('--shard_rows', type=float, default=1e8)
  parser.add_argument('--workdir', help='scratch folder (default: a temporary one)')
  parser.add_argument('--no_query_figures', dest='query_figures', action='store_false',
                      help='index: skip the recall curve and per-query search times')
  parser.add_argument('--keep', action='store_true', help='keep the scratch folder (its path is '
                      'printed), e.g. to serve its index again with --api_index')
  parser.add_argument('--json')
  args = parser.parse_args()
  parts = args.only or ['index', 'api', 'embed', 'extrapolate']
  figures = {}
  keep = contextlib.nullcontext(tempfile.mkdtemp(dir=args.workdir)) if args.keep else None
  with keep or tempfile.TemporaryDirectory(dir=args.workdir) as work:
    for part in parts:
      sub = os.path.join(work, part)
      os.makedirs(sub)
      if part == 'extrapolate':
        figures[part] = extrapolate(args, figures.get('index'))
        print('\n'.join(figures[part].pop('arithmetic')))
      else:
        if part == 'api' and 'index' in figures and not args.api_index:
          args.api_index = os.path.join(work, 'index', 'index')   # the part run before
        figures[part] = dict(index=bench_index, api=bench_api, embed=bench_embed)[part](args, sub)
      print(part, json.dumps(figures[part], indent=1), flush=True)
    if args.keep:
      print(f'kept: {work}')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(figures, f, indent=2)


if __name__ == '__main__':
  main()
