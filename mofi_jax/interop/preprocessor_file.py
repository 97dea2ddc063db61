"""preprocessor_config.json of a Hugging Face CLIP folder -> our eval preprocessing.

Every field we read is type- and range-checked here, naming the file and the field: a
`crop_size` of "big", a `shortest_edge` of null or an `image_std` of zeros (which would
turn every embedding into NaN) are refused at load, not found later as a TypeError or as
NaN features. Fields are those of transformers' CLIPImageProcessor; sizes may be an int
or its dict forms ({"shortest_edge": N}, {"height": N, "width": N}).
"""
import math

from mofi_jax.data import preprocess
from mofi_jax.interop.clip_config import InteropError

MAX_SIDE = 1 << 15   # a larger image side is a corrupt file, not a model
MIN_STD, MAX_NORM = 1e-6, 1e3


def _fail(path, field, expected, value):
  raise InteropError(f'{path}: field {field} must be {expected}, got {value!r}.')


def _flag(cfg, key, path):
  value = cfg.get(key, True)
  if not isinstance(value, bool):
    _fail(path, key, 'true or false', value)
  return value


def _side(value, path, field):
  if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIDE:
    _fail(path, field, f'a positive integer (at most {MAX_SIDE})', value)
  return value


def _finite(value, path, field):
  try:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
  except OverflowError:   # an int too large for a float
    ok = False
  if not ok:
    _fail(path, field, 'a finite number', value)
  return float(value)


def _channels(value, path, field):
  """Three finite floats; HF also accepts one number for all channels."""
  values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
  if not isinstance(values, list) or len(values) != 3:
    _fail(path, field, 'a list of 3 numbers (one per RGB channel)', value)
  return tuple(_finite(v, path, f'{field}[{i}]') for i, v in enumerate(values))


def _crop(cfg, path, image_size):
  if not _flag(cfg, 'do_center_crop', path):
    return image_size
  crop = cfg.get('crop_size', image_size)
  if not isinstance(crop, dict):
    return _side(crop, path, 'crop_size')
  height = _side(crop.get('height', image_size), path, 'crop_size.height')
  if crop.get('width', height) != height:
    _fail(path, 'crop_size.width', f'equal to crop_size.height ({height}): a square crop',
          crop.get('width'))
  return height


def _resize(cfg, path, image_size):
  """The shorter side before the crop: size.shortest_edge, or an int size."""
  size = cfg.get('size', {})
  if isinstance(size, dict):
    return _side(size.get('shortest_edge', image_size), path, 'size.shortest_edge')
  return _side(size, path, 'size')


def parse(cfg, path, image_size):
  """{resize, mean, std} of a parsed preprocessor_config.json, for a model of `image_size` px;
  raises InteropError naming `path` and the field."""
  if not isinstance(cfg, dict):
    raise InteropError(f'{path}: expected a JSON object, got {type(cfg).__name__}.')
  factor = _finite(cfg.get('rescale_factor', 1 / 255), path, 'rescale_factor')
  if not _flag(cfg, 'do_rescale', path) or not math.isclose(factor, 1 / 255, rel_tol=1e-6):
    raise InteropError(f'{path}: images must be rescaled by 1/255 (as ours are), got '
                       f'do_rescale={cfg.get("do_rescale")}, '
                       f'rescale_factor={cfg.get("rescale_factor")}.')
  crop = _crop(cfg, path, image_size)
  if crop != image_size:
    raise InteropError(f'{path}: crop_size {crop} differs from the model\'s image_size '
                       f'{image_size} (config.json vision_config).')
  resize = _resize(cfg, path, image_size)
  if not _flag(cfg, 'do_normalize', path):
    return dict(resize=resize, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  mean = _channels(cfg.get('image_mean', list(preprocess.CLIP_MEAN)), path, 'image_mean')
  std = _channels(cfg.get('image_std', list(preprocess.CLIP_STD)), path, 'image_std')
  # Folded into the patch embedding as std_c / std and mean / std (hf_import): bounds that
  # keep those finite in float32; real values are in [0, 1].
  if not all(abs(m) <= MAX_NORM for m in mean):
    _fail(path, 'image_mean', f'within [-{MAX_NORM:g}, {MAX_NORM:g}]', cfg.get('image_mean'))
  if not all(MIN_STD <= s <= MAX_NORM for s in std):
    _fail(path, 'image_std', f'within [{MIN_STD:g}, {MAX_NORM:g}] in every channel',
          cfg.get('image_std'))
  return dict(resize=resize, mean=mean, std=std)
