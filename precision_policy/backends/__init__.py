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

from pathlib import Path

from precision_policy.graph import register_graph_format


def is_tensorflow_model(path: Path) -> bool:
    """A TensorFlow GraphDef (``.pb``, ``.pbtxt``) or a SavedModel directory."""
    return path.suffix in (".pb", ".pbtxt") or (path.is_dir() and (path / "saved_model.pb").exists())


register_graph_format(
    "tensorflow",
    is_tensorflow_model,
    "precision_policy.backends.tensorflow",
    "TensorFlow and the TensorFlow backend (.pb, .pbtxt, SavedModel): pip install 'precision-policy[tensorflow]'",
)

__all__ = ["is_tensorflow_model"]
