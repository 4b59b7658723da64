"""``precision_policy.torch``: the PyTorch backend's public API (needs ``pip install 'precision-policy[torch]'``)."""

from precision_policy.backends.torch import *  # noqa: F401,F403
from precision_policy.backends.torch import __all__  # noqa: F401
