"""Hand-built I2E records for tests, made with the raw protobuf API so that
they are independent of `schema.make_example`."""
import tensorflow as tf


def raw_example(image=b'img', **overrides):
  """A schema-valid record except for `overrides` (a Feature, or None: removed)."""
  feature = {
      'image/encoded': tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
      'image/key': tf.train.Feature(bytes_list=tf.train.BytesList(value=[b'k'])),
      'entity/class': tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
      'entity/id': tf.train.Feature(bytes_list=tf.train.BytesList(value=[b'Q1'])),
      'entity/score': tf.train.Feature(float_list=tf.train.FloatList(value=[0.3])),
      'alt_text': tf.train.Feature(bytes_list=tf.train.BytesList(value=[b'hi'])),
      'alt_text/tokens': tf.train.Feature(int64_list=tf.train.Int64List(value=[1, 2])),
  }
  for name, value in overrides.items():
    if value is None:
      del feature[name]
    else:
      feature[name] = value
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
