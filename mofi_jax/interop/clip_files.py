"""Files of a Hugging Face folder: safetensors weights in and out.

Weights are read from safetensors only. Pickle-based files (pytorch_model.bin,
*.pt, *.ckpt) can run code when loaded, so a folder that has nothing else is
refused with a message saying to convert it; nothing here calls torch.load.
"""
import json
import os

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from mofi_jax.interop.clip_config import InteropError

WEIGHTS_FILE = 'model.safetensors'
WEIGHTS_INDEX = 'model.safetensors.index.json'
UNSAFE_WEIGHTS = ('pytorch_model.bin', 'pytorch_model.bin.index.json', 'model.pt',
                  'model.ckpt', 'tf_model.h5', 'flax_model.msgpack')


def read_safetensors(path):
  """({name: float32 np.ndarray}, metadata) of one safetensors file."""
  if not os.path.isfile(path):
    raise InteropError(f'{path}: file not found.')
  tensors = {}
  try:
    with safe_open(path, framework='numpy') as f:
      metadata = f.metadata() or {}
      for name in f.keys():
        if f.get_slice(name).get_dtype() == 'BF16':
          tensors[name] = _read_bfloat16(path, name)
        else:
          tensors[name] = np.asarray(f.get_tensor(name), np.float32)
  except (SafetensorError, OSError, ValueError) as e:
    raise InteropError(f'{path}: cannot read as safetensors, the file may be truncated '
                       f'or corrupt ({type(e).__name__}: {e}).') from e
  return tensors, metadata


def _read_bfloat16(path, name):
  # NumPy has no bfloat16; safetensors' Flax reader has (via ml_dtypes).
  with safe_open(path, framework='flax') as f:
    return np.asarray(f.get_tensor(name), np.float32)


def write_safetensors(path, tensors, metadata=None):
  """Writes float32 tensors; metadata['format']='pt' so transformers loads it."""
  # np.ascontiguousarray would turn a 0-d tensor (a scale) into shape [1].
  tensors = {k: np.array(v, np.float32, order='C') for k, v in tensors.items()}
  save_file(tensors, path, metadata={'format': 'pt', **(metadata or {})})


def weight_files(folder):
  """The safetensors files holding a folder's model weights."""
  single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, WEIGHTS_INDEX)
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    return _indexed_files(folder, index)
  unsafe = [n for n in UNSAFE_WEIGHTS if os.path.exists(os.path.join(folder, n))]
  if unsafe:
    raise InteropError(
        f'{folder}: weights are only in {", ".join(unsafe)}, a pickle-based format that '
        f'can run code when loaded; mofi_jax reads safetensors only. Convert them to '
        f'{WEIGHTS_FILE} where you trust the file (e.g. transformers '
        "`CLIPModel.from_pretrained(folder).save_pretrained(out)`).")
  raise InteropError(f'{folder}: no {WEIGHTS_FILE} (or {WEIGHTS_INDEX}) found.')


def _indexed_files(folder, index):
  try:
    with open(index, encoding='utf-8') as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise InteropError(f'{index}: not a safetensors index with a weight_map ({e}).') from e
  return [os.path.join(folder, n) for n in index_weight_files(raw, index)]


def index_weight_files(raw, index):
  """Sorted file names of a parsed model.safetensors.index.json: its weight_map must map
  tensor names to .safetensors files inside the folder."""
  weight_map = raw.get('weight_map') if isinstance(raw, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise InteropError(f'{index}: field weight_map must be a non-empty object of tensor '
                       f'name: file, got {type(weight_map).__name__}.')
  for name in weight_map.values():
    if (not isinstance(name, str) or os.path.basename(name) != name
        or not name.endswith('.safetensors')):
      raise InteropError(f'{index}: weight_map names weight file {name!r}, which is not a '
                         '.safetensors file inside the folder.')
  return sorted(set(weight_map.values()))


def read_weights(folder):
  """{tensor name: float32 np.ndarray} of every weight file of a folder."""
  tensors = {}
  for path in weight_files(folder):
    tensors.update(read_safetensors(path)[0])
  return tensors
