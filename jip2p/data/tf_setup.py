"""Imports TensorFlow for the data pipeline, hidden from every accelerator.

The JAX process owns the GPUs/TPUs; tf.data runs on the host CPU only. Every jip2p.data module
that needs TensorFlow gets it through `import_tf()`, so the device hiding happens once, before
TensorFlow initialises its devices.
"""

from __future__ import annotations

import functools
import logging
import os
import re


@functools.cache
def import_tf():
  """The `tensorflow` module with no GPU visible to it, and quiet: its C++ INFO logs off, and
  oneDNN's custom kernels off unless asked for (where the CPU has them, TensorFlow announces them
  on stderr at import, before its log level applies; tf.data's decoding and resizing here give
  the same records without them)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    # TensorFlow was initialised before jip2p.data was used; it must not have claimed a GPU.
    if tf.config.list_logical_devices("GPU"):
      logging.warning("TensorFlow was initialised with GPUs visible before jip2p.data hid them; "
                      "call jip2p.data.tf_setup.import_tf() before any other TensorFlow use.")
  return tf


def op_error_text(error) -> str:
  """A `tf.errors.OpError`'s message as one line for a user: without the wrapped function's name
  and the ``[Op:…]`` suffix that eager iteration adds."""
  text = re.sub(r"\{\{function_node [^}]*\}\}", "", error.message)
  text = re.sub(r"\[Op:\w+\].*", "", text, flags=re.S)
  return " ".join(text.split())
