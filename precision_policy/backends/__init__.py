"""Backends: TensorFlow (``backends.tensorflow``) and PyTorch (``backends.torch``).

Importing this package imports no framework. It registers the model file formats the
backends read with :func:`precision_policy.graph.load_graph`, so ``load_graph("model.pb")``
imports the TensorFlow backend only when it meets a TensorFlow file.

Example:
    >>> from pathlib import Path
    >>> is_tensorflow_model(Path("frozen.pb")), is_tensorflow_model(Path("graph.json"))
    (True, False)
"""

from __future__ import annotations

import os
from pathlib import Path

from precision_policy.graph import register_graph_format


def is_tensorflow_model(path: Path) -> bool:
    """A TensorFlow GraphDef (``.pb``, ``.pbtxt``) or a SavedModel directory."""
    # (os.path: a folder this process may not enter is "not a SavedModel" here; reading it names the folder)
    return path.suffix in (".pb", ".pbtxt") or (os.path.isdir(path) and os.path.exists(path / "saved_model.pb"))


register_graph_format(
    "tensorflow",
    is_tensorflow_model,
    "precision_policy.backends.tensorflow",
    "TensorFlow and the TensorFlow backend (.pb, .pbtxt, SavedModel): pip install 'precision-policy[tensorflow]'",
)

__all__ = ["is_tensorflow_model"]
