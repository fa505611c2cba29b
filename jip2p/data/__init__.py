"""Edit-triplet datasets: one schema, a sharded TFRecord writer, the tf.data reader, TFDS, imports.

  schema.py     the triplet's fields (no TensorFlow): what the writer, reader and TFDS share.
  writer.py     `DatasetWriter`: resumable sharded TFRecords + manifest + TFDS metadata.
  reader.py     `make_iterator`: per-host split, shuffle, paired augmentation, numpy batches.
  tfds.py       TFDS features, metadata, and the `instruct_pix2pix` builder over a manual dir.
  importers.py  the released datasets (HF parquet, the original generator's folders, MagicBrush).
  synthetic.py  the procedural edit world (no TensorFlow), for models trained from scratch.

Importing this package imports nothing heavy; `schema` stays free of TensorFlow so that processes
which only describe triplets do not pay for it. TensorFlow and PyTorch never share a process.
"""
