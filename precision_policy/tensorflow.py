"""``precision_policy.tensorflow``: the TensorFlow backend's public API (needs ``pip install 'precision-policy[tensorflow]'``)."""

from precision_policy.backends.tensorflow import *  # noqa: F401,F403
from precision_policy.backends.tensorflow import __all__  # noqa: F401
