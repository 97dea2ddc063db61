"""Input data for mofi_jax: the I2E corpus schema, tokenizer, synthetic demo corpus and tf.data pipeline."""
