"""Reads a W&B run file (`run-<id>.wandb`, what offline mode writes) with W&B's own protobuf
schema. wandb 0.31 moved its Python reader into the Go core, so the container is read here:
a 7-byte header (':W&B', magic 0xBEE1, version), then LevelDB's log format, 32 KiB blocks of
records [crc32c 4 | length 2 | type 1 | data], a record cut across blocks as FIRST, MIDDLE...,
LAST pieces (types 2, 3, 4; 1 is FULL); a block's tail under 7 bytes is padding."""
import json
import struct

BLOCK, HEADER = 32768, 7


def records(path):
  """The Records of a run file, in order."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  with open(path, 'rb') as f:
    data = f.read()
  if data[:4] != b':W&B':
    raise ValueError(f'{path}: not a W&B run file')
  pos, pending = HEADER, b''
  while pos + HEADER <= len(data):
    left = BLOCK - pos % BLOCK
    if left < HEADER:
      pos += left
      continue
    _, length, kind = struct.unpack('<IHB', data[pos:pos + HEADER])
    piece = data[pos + HEADER:pos + HEADER + length]
    pos += HEADER + length
    if kind == 0 and length == 0:
      break   # zero fill: the end of what was written
    pending += piece
    if kind in (1, 4):   # FULL or LAST
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b''
      yield record


def history(path):
  """[{'_step': s, key: value, ...}] of the run file's history records."""
  out = []
  for record in records(path):
    if record.WhichOneof('record_type') == 'history':
      row = {(i.key or '/'.join(i.nested_key)): json.loads(i.value_json)
             for i in record.history.item}
      if record.history.HasField('step'):
        row['_step'] = record.history.step.num
      out.append(row)
  return out


def run_id(path):
  for record in records(path):
    if record.WhichOneof('record_type') == 'run':
      return record.run.run_id
  return None
