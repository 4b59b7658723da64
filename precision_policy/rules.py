"""Which rule decided a node's dtype: the structured half of every plan decision.

Every node of a :class:`~precision_policy.plan.CastPlan` carries a :class:`Rule` and, for
rules that follow another node (a gray op following its producer), the name of the node it
followed. Code decides on these fields; the reason prose a plan shows (``summary``,
``explain``, JSON) is for people and is never parsed.

Example:
    >>> from precision_policy.rules import Rule
    >>> Rule.GRAY_FOLLOWS.value
    'gray_follows'
    >>> Rule("white") is Rule.WHITE
    True
"""

from __future__ import annotations

from enum import Enum


class Rule(str, Enum):
    """Why a node computes in the dtype it does. The value is what plan JSON stores."""

    # ---- nodes that compute nothing, or whose dtype is not the mode's to choose
    SOURCE = "source"
    """A graph input, constant or variable: keeps its dtype; consumers cast it."""
    NO_FLOAT_TENSORS = "no_float_tensors"
    """No float input or output: nothing to decide."""
    READS_SOURCE = "reads_source"
    """A pass-through (``Identity``, ``Enter``) of a source: treated as that source (a variable read)."""
    CONTROL_FLOW = "control_flow"
    """A TF v1 frame op (``Enter``, ``Merge``, ``Switch``, ``NextIteration``...): carries the values it is given."""
    HANDLE_TIED = "handle_tied"
    """A list/array op (``TensorList*``, ``TensorArray*``): its dtype is shared by every op of its handle."""
    EXISTING_CAST = "existing_cast"
    """A ``Cast`` written in the model: reads what its producer gives, writes its target."""
    UNKNOWN_OP = "unknown_op"
    """Not in the op-info library: keeps its origin dtype and is reported."""
    # ---- user overrides
    KEEP_DTYPE = "keep_dtype"
    """``keep_dtype`` names the node or its op type: keeps its origin dtype."""
    CUSTOMIZE_DTYPES = "customize_dtypes"
    """``customize_dtypes`` gives the node's input/output dtypes."""
    # ---- the precision mode's decision
    MODE = "mode"
    """The mode's preferred dtype for this op (``force_fp32``, ``cube op``, ``keeps float32``...)."""
    FLOAT64 = "float64"
    """A float64 op: precision modes act on float32 and 16-bit ops only."""
    FALLBACK_KERNEL = "fallback_kernel"
    """The preferred dtype has no kernel in the library: the next preference that has one."""
    NO_FLOAT_KERNEL = "no_float_kernel"
    """The library declares no float kernel for the op: keeps its origin dtype."""
    WHITE = "white"
    """Mixed modes: a white-list op runs low (or, without a low kernel, keeps its precision)."""
    BLACK = "black"
    """Mixed modes: a black-list op keeps its origin dtype."""
    GRAY_FOLLOWS = "gray_follows"
    """Mixed modes: a gray op follows the dtype its computing producers give it (``followed`` names one)."""
    GRAY_UNFED = "gray_unfed"
    """Mixed modes: a gray op fed only by constants/variables, decided as ``allow_fp32_to_<low>``."""
    GRAY_LOOKAHEAD = "gray_lookahead"
    """Mixed modes, look-ahead pass: a gray op runs low because every reader needs low (no extra cast)."""
    NO_KERNEL = "no_kernel"
    """The mode cannot be honoured for this op (planning raises a PrecisionError listing every such op)."""


__all__ = ["Rule"]
