"""Which rule decided a node's dtype: the structured half of every plan decision.

Every decision the planner and the eager backends take is a :class:`Why`: a :class:`Rule`
plus the facts behind it (the node it followed, the override that applied, the dtypes
that had no kernel, the decision underneath a composite one). Code decides on these
fields; the prose a plan shows (``summary``, ``explain``, JSON, the report) is rendered
from them by :mod:`precision_policy.reasons` and never parsed back.

Example:
    >>> from precision_policy.rules import Rule, Why
    >>> Rule.GRAY_FOLLOWS.value
    'gray_follows'
    >>> Rule("white") is Rule.WHITE
    True
    >>> Why(Rule.GRAY_FOLLOWS, followed="conv").followed
    'conv'
"""

from __future__ import annotations

from enum import Enum
from typing import Any, NamedTuple


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


#: The closed vocabulary of :attr:`Why.detail` (besides a precision mode's name, which a mode's
#: blanket rule carries, and a source kind ``input``/``const``/``variable``): what qualifies a rule.
DETAILS = frozenset({
    "cube_op",          # MODE: a cube (heavy) op runs in the low dtype
    "keeps_float32",    # MODE: keeps float32 where a kernel exists
    "vector_op",        # MODE: a vector op keeps float32 (allow_fp32_to_fp16)
    "keeps_origin",     # MODE: keeps its origin dtype
    "only_kernel",      # FALLBACK_KERNEL: none of the wanted dtypes has a kernel; its only float kernel
    "widest",           # GRAY_FOLLOWS: inputs disagree, followed the widest
    "lowest",           # GRAY_FOLLOWS: inputs disagree, followed the lowest
    "lookahead",        # READS_SOURCE: moved to the low dtype by the look-ahead pass
    "absorbed",         # EXISTING_CAST: writes what all its consumers need
    "loop_back",        # CONTROL_FLOW: carries a loop variable back in its Merge's dtype
    "loop_merge",       # CONTROL_FLOW: a loop variable in the dtype its body produces
    "no_float_input",   # CONTROL_FLOW: no float input
    "readers",          # HANDLE_TIED: the element dtype its readers and writers need
    "around",           # HANDLE_TIED: keeps its origin dtype, casts go around it
    "created",          # HANDLE_TIED: creates the list (its element dtype)
})


class Why(NamedTuple):
    """Why one node computes in its dtype, as data: the rule and the facts it was decided from.

    Example:
        >>> from precision_policy.rules import Rule, Why
        >>> w = Why(Rule.WHITE, inner=Why(Rule.FALLBACK_KERNEL, wanted=("float16",)))
        >>> Why.from_dict(w.to_dict()) == w
        True
    """

    rule: Rule
    followed: str | None = None
    """The node followed: a gray op's producer, a frame op's value, or the source a read reads."""
    detail: str = ""
    """A qualifier from :data:`DETAILS`, a precision mode's name, or a source kind."""
    where: str = ""
    """The user override behind the decision: ``keep.txt:2``, ``modify_mixlist mix.json: added to black-list``."""
    wanted: tuple[str, ...] = ()
    """Dtypes asked for that have no kernel (fallbacks); the dtype a gray op followed; the low dtype of a moved read."""
    inner: Why | None = None
    """The decision underneath a composite one (white-list *but* no low kernel; gray *fed only by constants*: the mode's)."""

    def to_dict(self) -> dict[str, Any]:
        """The plan-JSON form: only the fields that are set."""
        out: dict[str, Any] = {"rule": self.rule.value}
        if self.followed is not None:
            out["followed"] = self.followed
        if self.detail:
            out["detail"] = self.detail
        if self.where:
            out["where"] = self.where
        if self.wanted:
            out["wanted"] = list(self.wanted)
        if self.inner is not None:
            out["inner"] = self.inner.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Why:
        """Read :meth:`to_dict`'s form back (raises ValueError/TypeError/KeyError on a malformed one)."""
        inner = data.get("inner")
        followed = data.get("followed")
        return cls(
            Rule(data["rule"]),
            None if followed is None else str(followed),
            str(data.get("detail", "")),
            str(data.get("where", "")),
            tuple(str(d) for d in data.get("wanted", ())),
            None if inner is None else cls.from_dict(inner),
        )


__all__ = ["DETAILS", "Rule", "Why"]
