"""`python -m mofi_jax.serve`, started as a subprocess on 127.0.0.1 and queried over HTTP,
over an index of the tiny corpus's held-out images embedded by `python -m mofi_jax.embed`
with a tiny random model. Every score equals a NumPy dot product of the stored embeddings
and an Encoder embedding computed here; clip-back's routes answer in clip-back's shapes;
bad uploads get a 4xx and the server answers on; the page, driven in headless Chromium,
shows the query image as its own top result.

Regenerate the docs' screenshot: UPDATE_FIGURES=1 python -m pytest tests/test_serve.py -k page
"""
import base64
import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from mofi_jax import embed, inference, search_index, search_service
from mofi_jax import index as index_cli
from mofi_jax.evals import entities as entity_ranking
from portable_runner import free_port
from test_embed import png_header_bomb
from test_evaluate import encoder, tiny_run  # pylint: disable=unused-import  # fixtures
from test_search import K, _NoHead, check_hits

httpx = pytest.importorskip('httpx')
pytest.importorskip('faiss')
pytest.importorskip('fastapi')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
MAX_UPLOAD_MB = 1


@pytest.fixture(scope='module')
def collection(tiny_corpus, tiny_run, encoder, tmp_path_factory):
  """(index folder, image paths in row order, the stored embeddings [N, D] as float64)."""
  root = tmp_path_factory.mktemp('serve')
  photos = root / 'photos'
  shutil.copytree(os.path.join(tiny_corpus, 'retrieval'), photos)
  with pytest.MonkeyPatch.context() as patch:   # reuse the compiled encoder
    patch.setattr(inference, 'load', lambda workdir, step=None: encoder)
    embed.main(['--workdir', tiny_run, '--out', str(root / 'emb'), '--images', str(photos),
                '--shard_size', '32', '--batch_size', '16'])
  index_cli.main(['--embeddings', str(root / 'emb'), '--out', str(root / 'index')])
  shards = sorted(glob.glob(str(root / 'emb' / 'img_emb' / '*.npy')),
                  key=lambda p: int(p.split('_')[-1][:-4]))
  vectors = np.concatenate([np.load(p) for p in shards]).astype(np.float64)
  paths = []
  for i in range(len(shards)):
    table = pq.read_table(root / 'emb' / 'metadata' / f'metadata_{i}.parquet')
    paths += table['image_path'].to_pylist()
  return str(root / 'index'), paths, vectors


@pytest.fixture(scope='module')
def server(collection, tiny_run, tmp_path_factory):
  """The base URL of a running server (its log is printed if it fails to start)."""
  port = free_port()
  log = tmp_path_factory.mktemp('serve_log') / 'server.log'
  with open(log, 'wb') as out:
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, '-m', 'mofi_jax.serve', '--index', collection[0], '--workdir',
         tiny_run, '--port', str(port), '--max_upload_mb', str(MAX_UPLOAD_MB)],
        cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
  url = f'http://127.0.0.1:{port}'
  try:
    wait_for_health(url, proc, log)
    yield url
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def wait_for_health(url, proc, log, timeout=180):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'the server exited ({proc.returncode}):\n{log.read_text()}')
    try:
      if httpx.get(f'{url}/health', timeout=2).status_code == 200:
        return
    except httpx.TransportError:
      pass
    time.sleep(0.3)
  raise RuntimeError(f'no /health after {timeout} s:\n{log.read_text()}')


def read(path):
  with open(path, 'rb') as f:
    return f.read()


def category(path):
  return os.path.basename(path).split('_')[0]


def test_image_query_finds_itself_and_serves_its_file(server, collection, encoder):
  _, paths, vectors = collection
  data = read(paths[7])
  reply = httpx.post(f'{server}/search', files={'image': ('q.jpg', data, 'image/jpeg')},
                     data={'k': str(K)}, timeout=60)
  assert reply.status_code == 200, reply.text
  results = reply.json()['results']
  check_hits(results, vectors, encoder.embed_images(encoder.preprocess([data]))[0], paths)
  assert results[0]['row'] == 7 and results[0]['image'] == 'images/7'
  assert httpx.get(f'{server}/{results[0]["image"]}').content == data
  same = [category(paths[h['row']]) == category(paths[7]) for h in results]
  assert same[0] and sum(same) >= 2   # the random tiny model still groups its category


def test_concurrent_queries_answer_as_one_at_a_time(server, collection):
  paths = collection[1][:8]

  def query(path):
    return httpx.post(f'{server}/search', files={'image': ('q.jpg', read(path))},
                      data={'k': '3'}, timeout=120).json()['results']
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    together = list(pool.map(query, paths))
  assert together == [query(p) for p in paths]


def test_entities_are_the_heads_top_logits(server, collection, encoder):
  data = read(collection[1][3])
  reply = httpx.post(f'{server}/entities', files={'image': ('q.jpg', data)},
                     data={'k': '4'}, timeout=60)
  assert reply.status_code == 200, reply.text
  raw = encoder.embed_images(encoder.preprocess([data]), normalize=False)[0].astype(np.float64)
  kernel = np.asarray(encoder.params['entity_head']['kernel'], np.float64)
  c = len(encoder.entities.ids)
  bias = np.asarray(encoder.params['entity_head'].get('bias', np.zeros(c)), np.float64)[:c]
  logits = raw @ kernel[:, :c] + bias
  got = reply.json()['entities']
  assert [e['id'] for e in got] == [encoder.entities.ids[i] for i in np.argsort(-logits)[:4]]
  np.testing.assert_allclose([e['score'] for e in got], np.sort(logits)[::-1][:4], rtol=1e-4,
                             atol=1e-4)


def test_text_and_entity_queries(server, collection, encoder):
  _, paths, vectors = collection
  text = 'a cyan circle on a gradient background'
  reply = httpx.post(f'{server}/search', json={'text': text, 'k': K}, timeout=60)
  check_hits(reply.json()['results'], vectors, encoder.embed_texts([text])[0], paths)
  as_form = httpx.post(f'{server}/search', data={'text': text, 'k': str(K)}, timeout=60)
  assert as_form.json()['results'] == reply.json()['results']
  qid = encoder.entities.ids[3]
  reply = httpx.post(f'{server}/search', json={'entity': qid, 'k': K}, timeout=60)
  assert reply.json()['query'] == {'kind': 'entity', 'entity': qid, 'how': 'head'}
  kernel = np.asarray(encoder.params['entity_head']['kernel'], np.float32)[:, 3]
  check_hits(reply.json()['results'], vectors, kernel / np.linalg.norm(kernel), paths)


def test_clip_back_routes_answer_in_clip_backs_shapes(server, collection):
  index, paths, _ = collection
  name = os.path.basename(index)
  assert httpx.get(f'{server}/indices-list').json() == [name]
  data = read(paths[12])
  # clip-front's fetch sends its JSON body with no JSON content type.
  body = ('{"text": null, "image": "%s", "image_url": null, "modality": "image", '
          '"num_images": 3, "indice_name": "%s", "num_result_ids": 3, "use_mclip": false, '
          '"deduplicate": true, "use_safety_model": false}'
          % (base64.b64encode(data).decode(), name))
  knn = httpx.post(f'{server}/knn-service', content=body,
                   headers={'content-type': 'text/plain;charset=UTF-8'}, timeout=60).json()
  ours = httpx.post(f'{server}/search', files={'image': ('q.jpg', data)}, data={'k': '3'},
                    timeout=60).json()['results']
  assert [r['id'] for r in knn] == [h['row'] for h in ours] and knn[0]['id'] == 12
  np.testing.assert_allclose([r['similarity'] for r in knn], [h['score'] for h in ours],
                             atol=1e-6)
  for r in knn:
    assert isinstance(r['id'], int) and isinstance(r['similarity'], float)
    assert r['image_path'] == paths[r['id']] and 'url' not in r   # None columns left out
    assert base64.b64decode(r['image']) == read(paths[r['id']])
  meta = httpx.post(f'{server}/metadata', content=f'{{"ids": [12, 0], "indice_name": "{name}"}}',
                    timeout=60).json()
  assert [m['id'] for m in meta] == [12, 0]
  assert meta[0]['metadata'] == {k: v for k, v in knn[0].items() if k not in ('id', 'similarity')}
  text = httpx.post(f'{server}/knn-service', json={'text': 'a red square', 'modality': 'text',
                                                   'num_images': 3, 'indice_name': name})
  assert text.status_code == 400 and 'image embeddings only' in text.json()['error']


def refused(reply, status, words):
  assert reply.status_code == status, reply.text
  assert words in reply.json()['error'], reply.json()


def test_bad_uploads_get_4xx_and_the_server_answers_on(server, collection, encoder):
  _, paths, vectors = collection
  def post(**kw):
    return httpx.post(f'{server}/search', timeout=60, **kw)
  refused(post(files={'image': ('x.jpg', b'<html>not an image</html>')}), 415, 'not an image')
  refused(post(files={'image': ('x.jpg', b'')}), 400, 'empty upload')
  refused(post(files={'image': ('x.png', png_header_bomb(20000, 20000))}), 413, '400000000 pixels')
  big = os.urandom(MAX_UPLOAD_MB << 20) + b'\xff'
  refused(post(files={'image': ('x.jpg', big)}), 413, 'over the limit')
  refused(post(files={'image': ('x.gif', b'GIF89a' + b'\0' * 100)}), 415, 'not an image')
  refused(post(json={'entity': 'Q999999999'}), 400, 'not in the model\'s entity table')
  refused(post(json={'text': 'x', 'k': 0}), 400, 'k=0')
  refused(post(json={}), 400, 'exactly one of')
  refused(post(content=b'{not json', headers={'content-type': 'application/json'}), 400,
          'not JSON')
  refused(post(json={'image': 'not base64!'}), 400, 'not valid base64')
  refused(post(content=b'--x\r\nnot a part', headers={'content-type': 'multipart/form-data'}),
          400, 'Missing boundary in multipart')
  refused(httpx.get(f'{server}/images/{len(paths)}'), 404, 'no such row')
  refused(httpx.get(f'{server}/no-such-route'), 404, 'Not Found')
  data = read(paths[20])
  results = post(files={'image': ('q.jpg', data)}, data={'k': str(K)}).json()['results']
  check_hits(results, vectors, encoder.embed_images(encoder.preprocess([data]))[0], paths)
  assert httpx.get(f'{server}/health').json()['status'] == 'ok'
  documented = httpx.get(f'{server}/openapi.json').json()['paths']
  assert {'/search', '/entities', '/health', '/knn-service', '/metadata'} <= set(documented)


def test_entities_without_a_head_is_a_clear_404(collection, encoder):
  service = search_service.SearchService(_NoHead(encoder), search_index.load(collection[0]))
  with pytest.raises(search_service.ServeError) as error:
    service.entities(read(collection[1][0]))
  assert error.value.status == 404 and 'no entity head' in str(error.value)
  assert service.health()['has_head'] is False


def test_rows_outside_the_image_folder_are_not_served(collection, encoder, tmp_path):
  service = search_service.SearchService(encoder, search_index.load(collection[0]),
                                         root=str(tmp_path))
  with pytest.raises(search_service.ServeError) as error:
    service.image_file(0)
  assert error.value.status == 404
  (tmp_path / 'link.jpg').symlink_to(collection[1][0])   # resolves outside the root
  assert service.served_path({'image_path': str(tmp_path / 'link.jpg')}) is None
  assert service.served_path({'image_path': str(tmp_path / '..' / 'x.jpg')}) is None


def chrome():
  webdriver = pytest.importorskip('selenium.webdriver')
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f'{CHROMIUM} or {CHROMEDRIVER} missing (apt-get install chromium '
                'chromium-driver)')
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM   # with the driver's path: Selenium Manager not used
  for flag in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
               '--window-size=1100,800'):
    options.add_argument(flag)
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.required
def test_page_in_headless_chromium(server, collection, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=import-outside-toplevel
  _, paths, _ = collection
  driver = chrome()
  try:
    driver.get(f'{server}/')
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: 'images in' in d.find_element(By.ID, 'info').text)
    driver.find_element(By.ID, 'file').send_keys(paths[31])
    wait.until(lambda d: d.find_element(By.ID, 'status').text.endswith('results'))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#entities .entity'))
    wait.until(lambda d: d.execute_script(
        'return [...document.querySelectorAll(".hit img")].every(i => i.complete)'))
    captions = [e.text for e in driver.find_elements(By.CSS_SELECTOR, '.hit .caption')]
    assert len(captions) == 20 and category(captions[0]) == category(paths[31])
    assert captions[0] == os.path.basename(paths[31])
    assert driver.execute_script('return document.querySelector(".hit img").naturalWidth') > 0
    driver.save_screenshot(str(tmp_path / 'search_page.png'))
    if os.environ.get('UPDATE_FIGURES'):
      driver.save_screenshot(os.path.join(ROOT, 'docs', 'figures', 'search_page.png'))
  finally:
    driver.quit()
  assert os.path.getsize(tmp_path / 'search_page.png') > 1000
