"""Every notebook runs top to bottom at demo scale (as CI executes them) and its own
checks hold, each against something it did not draw itself:
  01  the entity histogram's counts equal the labels counted in the corpus shards;
  02  the last held-out retrieval mAP is over 3x the chance mAP of random features;
  03  over every query, the top hit shares the query's category for at least half of them
      (chance is about 2%);
  04  PyTorch (the exported HF folder) and JAX similarities agree to 1e-4;
  05  entity search's precision@10 against the world's ground truth is over 5x chance, an
      image query through the (exact) index finds itself and the brute-force top 5, and the
      HTTP server answers a text query with the rows of the in-process search.

The notebooks share one folder, so later ones reuse the corpus and the run that
earlier ones built; each also works alone (it builds what is missing).
"""
import os

import nbformat
from nbclient import NotebookClient

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'notebooks')
NOTEBOOKS = sorted(n for n in os.listdir(NOTEBOOK_DIR) if n.endswith('.ipynb'))


def test_notebooks_are_committed_without_outputs():
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    outputs = [c for c in nb.cells if c.cell_type == 'code' and c.get('outputs')]
    assert not outputs, f'{name}: clear the outputs before committing'


def test_notebooks_run_in_order(tmp_path, monkeypatch):
  """One test, in order, so that the corpus and the run are built once (not per worker)."""
  monkeypatch.setenv('MOFI_NOTEBOOK_DIR', str(tmp_path))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('XLA_FLAGS', '')   # one CPU device in the kernels
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    NotebookClient(nb, timeout=900, kernel_name='python3',
                   resources={'metadata': {'path': str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
              if o.get('output_type') == 'error']
    assert not errors, f'{name}: {errors}'
