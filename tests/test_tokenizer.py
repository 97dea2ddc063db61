"""Tests for mofi_jax/data/tokenizer.py against the raw HF tokenizers encodings."""
import numpy as np
import pytest

from mofi_jax.data import tokenizer as tokenizer_lib

CORPUS = ['Photo of Zorvath at the fair', 'Kelmira and friends', 'a red star on a dark background',
          'an orange ring on a checkered background', 'my shiny Zorvath', 'untitled wallpaper'] * 20


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.train_bpe(CORPUS, vocab_size=350)


def test_special_token_ids(tok):
  assert tok.token_to_id('<pad>') == tokenizer_lib.PAD_ID == 0
  bos, eot = tokenizer_lib.bos_id(tok), tokenizer_lib.eot_id(tok)
  assert {bos, eot} == {1, 2}
  ids = tok.encode('zorvath at the fair').ids
  assert ids[0] == bos and ids[-1] == eot
  assert 0 not in ids


def test_lowercases(tok):
  np.testing.assert_array_equal(tokenizer_lib.tokenize(tok, ['ZORVATH At The FAIR'], 16),
                                tokenizer_lib.tokenize(tok, ['zorvath at the fair'], 16))


def test_tokenize_pads_and_matches_raw_encoding(tok):
  texts = ['zorvath', 'kelmira and friends', '']
  out = tokenizer_lib.tokenize(tok, texts, 12)
  assert out.dtype == np.int32 and out.shape == (3, 12)
  for row, text in zip(out, texts):
    ids = tok.encode(text).ids  # Reference: the untruncated encoding.
    assert len(ids) <= 12
    np.testing.assert_array_equal(row[:len(ids)], ids)
    assert np.all(row[len(ids):] == 0)


@pytest.mark.parametrize('length', [2, 3, 5, 8])
def test_truncation_keeps_eot_last(tok, length):
  texts = ['photo of zorvath at the fair with kelmira and friends on a dark background', 'a']
  out = tokenizer_lib.tokenize(tok, texts, length)
  eot = tokenizer_lib.eot_id(tok)
  for row, text in zip(out, texts):
    n = np.count_nonzero(row)
    assert row[n - 1] == eot  # The text tower pools here.
    ids = tok.encode(text).ids
    expected = ids if len(ids) <= length else ids[:length - 1] + [eot]
    np.testing.assert_array_equal(row[:n], expected)


def test_unseen_characters_roundtrip(tok):
  text = 'über 日本 ✓'
  ids = tok.encode(text).ids
  assert tok.decode(ids) == text  # Byte-level: nothing maps to an unknown token.


def test_save_load_roundtrip(tok, tmp_path):
  path = tmp_path / 'tokenizer.json'
  tok.save(str(path))
  loaded = tokenizer_lib.load_tokenizer(path)
  np.testing.assert_array_equal(tokenizer_lib.tokenize(loaded, CORPUS[:6], 10),
                                tokenizer_lib.tokenize(tok, CORPUS[:6], 10))


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.json'):
    tokenizer_lib.load_tokenizer(tmp_path / 'missing.json')
  bad = tmp_path / 'bad.json'
  bad.write_text('{"not": "a tokenizer"')
  with pytest.raises(ValueError, match='bad.json'):
    tokenizer_lib.load_tokenizer(bad)


def test_load_rejects_tokenizer_without_specials(tmp_path):
  import tokenizers  # pylint: disable=g-import-not-at-top
  plain = tokenizers.Tokenizer(tokenizers.models.BPE())
  plain.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(vocab_size=100,
                                                                   show_progress=False))
  path = tmp_path / 'plain.json'
  plain.save(str(path))
  with pytest.raises(ValueError, match='<pad>'):
    tokenizer_lib.load_tokenizer(path)


def test_tokenize_argument_errors(tok):
  with pytest.raises(ValueError, match='length'):
    tokenizer_lib.tokenize(tok, ['a'], 1)
  with pytest.raises(TypeError, match='list of strings'):
    tokenizer_lib.tokenize(tok, 'a', 4)
