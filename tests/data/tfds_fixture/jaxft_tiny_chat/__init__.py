"""A tiny TFDS dataset for the data tests (built locally as array_record; no TensorFlow)."""
