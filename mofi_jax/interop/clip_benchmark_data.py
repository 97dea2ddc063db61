r"""Our eval folders -> CLIP_benchmark's webdataset layout, so that `clip_benchmark eval
--dataset wds/NAME --dataset_root OUT` scores the very images `python -m mofi_jax.evaluate`
scores (CLIP_benchmark reads no arbitrary ImageFolder or captions file itself).

  python -m mofi_jax.interop.clip_benchmark_data --imagefolder D [--split test] \
      [--templates imagenet | "a photo of a {}."] --out OUT
  python -m mofi_jax.interop.clip_benchmark_data --captions D --out OUT

--imagefolder: torchvision's class_name/*.jpg layout (evals/class_folders.py; `--split`
'all', 'train' or 'test'); writes classnames.txt (classnames.txt of D, else the folder
names) and zeroshot_classification_templates.txt (one of our template sets, or one
template, with CLIP_benchmark's `{c}`), and a `.cls` label per image.
--captions: a folder with captions.jsonl or captions.csv (evals/image_text.py); writes
dataset_type.txt `retrieval` and each image's captions as its `.txt`, one per line.

OUT/test/{0..N-1}.tar (1,000 images a shard) and OUT/test/nshards.txt. JPEG, PNG and WebP
bytes are copied as they are; other formats (BMP, GIF) are re-encoded as PNG, since
CLIP_benchmark decodes only those three. OUT is written aside and renamed when complete;
a non-empty OUT is refused unless --overwrite (which replaces only an earlier output of
this tool).
"""
import argparse
import io
import os
import sys

# Before TensorFlow loads (tf.io.gfile): its C++ INFO lines would bury the one-line error.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from mofi_jax import cli_errors, safe_outputs  # pylint: disable=g-import-not-at-top,wrong-import-position

TOOL = 'mofi_jax.interop.clip_benchmark_data'
SHARD_SIZE = 1000
KEPT = {'.jpg': 'jpg', '.jpeg': 'jpg', '.png': 'png', '.webp': 'webp'}


def _image(path):
  """(webdataset extension, bytes) of an image file."""
  with open(path, 'rb') as f:
    data = f.read()
  ext = KEPT.get(os.path.splitext(path)[1].lower())
  if ext:
    return ext, data
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as image:
      buf = io.BytesIO()
      image.convert('RGB').save(buf, format='PNG')
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    raise ValueError(f'{path}: not a readable image ({type(e).__name__}: {e}).') from e
  return 'png', buf.getvalue()


def _write_shards(folder, samples):
  """samples: [(image path, {extension: value})] -> folder/test/{i}.tar, nshards.txt."""
  import webdataset  # pylint: disable=g-import-not-at-top  (the `clip` extra)
  test = os.path.join(folder, 'test')
  os.makedirs(test)
  shards = max(1, -(-len(samples) // SHARD_SIZE))
  for s in range(shards):
    with webdataset.TarWriter(os.path.join(test, f'{s}.tar')) as tar:
      for i, (path, fields) in enumerate(samples[s * SHARD_SIZE:(s + 1) * SHARD_SIZE]):
        ext, data = _image(path)
        tar.write({'__key__': f'{s * SHARD_SIZE + i:08d}', ext: data, **fields})
  _write_lines(os.path.join(test, 'nshards.txt'), [str(shards)])


def _write_lines(path, lines):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(''.join(f'{line}\n' for line in lines))


def write_classification(folder, out, split='test', templates='imagenet', overwrite=False):
  from mofi_jax.evals import class_folders, templates as templates_lib  # pylint: disable=g-import-not-at-top
  paths, labels, classes = class_folders.list_split(folder, split)
  names = class_folders.class_names(folder, classes)
  prompts = templates_lib.resolve(templates)
  bad = [n for n in names if '\n' in n]
  if bad:
    raise ValueError(f'{folder}: class name {bad[0]!r} holds a line break; classnames.txt '
                     'has one name a line.')
  with safe_outputs.staged_output(out, TOOL, overwrite,
                                  inputs=[('--imagefolder', folder)]) as tmp:
    _write_shards(tmp, [(p, {'cls': int(y)}) for p, y in zip(paths, labels)])
    _write_lines(os.path.join(tmp, 'classnames.txt'), names)
    _write_lines(os.path.join(tmp, 'zeroshot_classification_templates.txt'),
                 [t.replace('{}', '{c}') for t in prompts])
  return out


def write_retrieval(folder, out, overwrite=False):
  from mofi_jax.evals import image_text  # pylint: disable=g-import-not-at-top
  images, captions, owner = image_text.load_pairs(folder)
  by_image = [[] for _ in images]
  for caption, i in zip(captions, owner):
    by_image[i].append(' '.join(caption.split()))   # one caption a line
  with safe_outputs.staged_output(out, TOOL, overwrite, inputs=[('--captions', folder)]) as tmp:
    _write_shards(tmp, [(p, {'txt': '\n'.join(c)}) for p, c in zip(images, by_image)])
    _write_lines(os.path.join(tmp, 'dataset_type.txt'), ['retrieval'])
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(prog=f'python -m {TOOL}')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--imagefolder', help='class_name/*.jpg folder (zero-shot classification)')
  source.add_argument('--captions', help='folder with captions.jsonl or .csv (retrieval)')
  parser.add_argument('--split', default='test', help='imagefolder split: all, train or test')
  parser.add_argument('--templates', default='imagenet',
                      help='a template set (imagenet, cifar, identity, ...) or "..{}.."')
  parser.add_argument('--out', required=True)
  parser.add_argument('--overwrite', action='store_true',
                      help="replace an earlier output of this tool at --out")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    out = (write_classification(args.imagefolder, args.out, args.split, args.templates,
                                args.overwrite)
           if args.imagefolder else write_retrieval(args.captions, args.out, args.overwrite))
  except cli_errors.input_errors() as e:
    sys.exit(f'{TOOL}: error: {cli_errors.one_line(e)}')
  print(out)
  return out


if __name__ == '__main__':
  main()
