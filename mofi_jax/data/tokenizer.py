"""Byte-level BPE tokenizer (HF `tokenizers`) for alt-texts and entity names.

Every encoded text is `<bos> ... <eot>`. The text tower pools the feature at index
`count_nonzero(tokens) - 1`, so `tokenize` guarantees that `<eot>` is the last
non-pad token of every row, also when the text had to be truncated.
"""
import os

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD_TOKEN, BOS_TOKEN, EOT_TOKEN = '<pad>', '<bos>', '<eot>'
# The order fixes the ids: padding must be 0 so that `count_nonzero` counts real tokens.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOT_TOKEN)
PAD_ID = 0


def train_bpe(texts, vocab_size):
  """Trains a lower-casing byte-level BPE on `texts` (an iterable of str)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
      # The full byte alphabet keeps every UTF-8 text encodable, even unseen characters.
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
  tok.post_processor = processors.TemplateProcessing(
      single=f'{BOS_TOKEN} $A {EOT_TOKEN}',
      special_tokens=[(BOS_TOKEN, ids[BOS_TOKEN]), (EOT_TOKEN, ids[EOT_TOKEN])])
  _check_special_tokens(tok, 'train_bpe')
  return tok


def load_tokenizer(path):
  """Loads a `tokenizer.json`; raises a clear error if it is missing or corrupt."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: tokenizer file not found (expected a HF tokenizers JSON).')
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # The Rust side raises a bare Exception on bad JSON.
    raise ValueError(f'{path}: not a valid HF tokenizers JSON file ({e}).') from e
  _check_special_tokens(tok, path)
  # `tokenize` pads and truncates itself; settings saved in the file would hide EOT.
  tok.no_padding()
  tok.no_truncation()
  return tok


def _check_special_tokens(tok, where):
  pad_id = tok.token_to_id(PAD_TOKEN)
  if pad_id != PAD_ID:
    raise ValueError(f'{where}: token {PAD_TOKEN!r} must have id {PAD_ID}, got {pad_id}.')
  for t in (BOS_TOKEN, EOT_TOKEN):
    if tok.token_to_id(t) is None:
      raise ValueError(f'{where}: special token {t!r} is missing from the vocabulary.')
  probe = tok.encode('a').ids
  if not probe or probe[0] != bos_id(tok) or probe[-1] != eot_id(tok):
    raise ValueError(f'{where}: post-processor must wrap texts as "{BOS_TOKEN} $A {EOT_TOKEN}", '
                     f'but encoding "a" gave ids {probe}.')


def bos_id(tok):
  return tok.token_to_id(BOS_TOKEN)


def eot_id(tok):
  return tok.token_to_id(EOT_TOKEN)


def fit_ids(ids, length, eot):
  """Truncates a `<bos> ... <eot>` id list to `length`, keeping `<eot>` last."""
  if len(ids) > length:
    ids = list(ids[:length - 1]) + [eot]
  return ids


def tokenize(tokenizer, texts, length):
  """Texts -> np.int32 [N, length]: `<bos> ... <eot>`, right-padded with PAD_ID."""
  if length < 2:
    raise ValueError(f'tokenize: length must be >= 2 to hold <bos> and <eot>, got {length}.')
  if isinstance(texts, str):
    raise TypeError('tokenize: `texts` must be a list of strings, not a single string.')
  eot = eot_id(tokenizer)
  encodings = tokenizer.encode_batch(list(texts))
  out = np.full((len(encodings), length), PAD_ID, np.int32)
  for row, enc in zip(out, encodings):
    ids = fit_ids(enc.ids, length, eot)
    row[:len(ids)] = ids
  return out
