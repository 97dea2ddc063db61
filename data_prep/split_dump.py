r"""Splits the official single-file Wikidata dump into line-aligned gzip chunks.

  python -m data_prep.split_dump --dump latest-all.json.bz2 --out /data/dump_chunks
  lbzip2 -dc latest-all.json.bz2 | python -m data_prep.split_dump --dump - --out /data/chunks
  python -m data_prep.build_kb --wikidata '/data/dump_chunks/*.json.gz' --out /data/kb

A compressed file cannot be split between Beam workers, so one worker would decompress and
parse the ~100 GB dump alone. The chunks (`chunk-NNNNN.json.gz`, `--lines` entity lines
each) are read in parallel, one per worker. Each keeps whole lines, so the '[' / ']' array
brackets stay in the first and last chunk, where build_kb skips them. bzip2 decompression
is the slow part of this command (~30-50 MB/s on one core); `lbzip2 -dc ... | --dump -`
decompresses on every core.

Chunks are written to a staging folder and renamed into --out when complete, with a
manifest (chunks.json: chunk names, line counts, input) written last.
"""
import argparse
import bz2
import gzip
import json
import os
import shutil
import sys

from mofi_jax import cli_errors

MANIFEST = 'chunks.json'


def open_dump(path):
  if path == '-':
    return sys.stdin.buffer
  opener = {'.bz2': bz2.open, '.gz': gzip.open}.get(os.path.splitext(path)[1], open)
  return opener(path, 'rb')


def split(dump, out_dir, lines_per_chunk, compresslevel=1):
  """Writes the chunks of `dump` (path or '-') into the new folder `out_dir`; returns the
  manifest."""
  staging = f'{out_dir.rstrip("/")}.staging-{os.getpid()}'
  os.makedirs(staging)
  chunks, counts, writer = [], [], None
  try:
    with open_dump(dump) as src:
      for line in src:
        if writer is None or counts[-1] >= lines_per_chunk:
          if writer is not None:
            writer.close()
          chunks.append(f'chunk-{len(chunks):05d}.json.gz')
          counts.append(0)
          writer = gzip.open(os.path.join(staging, chunks[-1]), 'wb', compresslevel)
        writer.write(line)
        counts[-1] += 1
    if writer is not None:
      writer.close()
    manifest = dict(input=dump, chunks=chunks, lines=counts, total_lines=sum(counts))
    with open(os.path.join(staging, MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=1)
    os.rename(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return manifest


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m data_prep.split_dump', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dump', required=True, help="latest-all.json[.bz2|.gz], or - (stdin)")
  parser.add_argument('--out', required=True, help='folder to create (must not exist)')
  parser.add_argument('--lines', type=int, default=200_000,
                      help='entity lines per chunk (the full dump: ~110M lines, ~550 chunks)')
  args = parser.parse_args(argv)
  if args.lines < 1:
    parser.error(f'--lines must be >= 1, got {args.lines}')
  if args.dump != '-' and not os.path.isfile(args.dump):
    parser.error(f'--dump {args.dump}: no such file')
  if os.path.exists(args.out):
    parser.error(f'--out {args.out} exists; choose a new folder')
  try:
    manifest = split(args.dump, args.out, args.lines)
  except (EOFError,) + cli_errors.input_errors() as e:   # a truncated or corrupt dump
    sys.exit(f'split_dump: error: {args.dump}: {cli_errors.one_line(e)}')
  print(f'split_dump: {manifest["total_lines"]} lines -> {len(manifest["chunks"])} chunks in '
        f'{args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
