"""The op taxonomy: which op types are sources, pass-throughs, control flow, data movement.

Every structural role an op type plays for the planner is named here, in one place: the
graph model (:mod:`precision_policy.graph`), the planner and the backends import these sets
rather than spelling op names of their own. Precision *flags* (white/black/gray) are not
here: they come from the op-info library.

Example:
    >>> from precision_policy import optypes
    >>> optypes.SOURCE_KINDS["VariableV2"], "Identity" in optypes.PASSTHROUGH_OPS
    ('variable', True)
    >>> "Reshape" in optypes.DATA_MOVEMENT_OPS, "Relu" in optypes.VALUE_PRESERVING_OPS
    (True, True)
"""

from __future__ import annotations

#: op type -> kind of source. Sources never compute: they keep their dtype, and a cast
#: of a "const" source is done once ahead of time, of a "variable" after each read.
SOURCE_KINDS: dict[str, str] = {
    "Placeholder": "input",
    "PlaceholderWithDefault": "input",
    "PlaceholderV2": "input",
    "_Arg": "input",
    "Input": "input",
    "Const": "const",
    "HostConst": "const",
    "Constant": "const",
    "Variable": "variable",
    "VariableV2": "variable",
    "VarHandleOp": "variable",
    "ReadVariableOp": "variable",
    "Parameter": "variable",
    "Buffer": "variable",
}

#: Ops that forward their single input unchanged. A pass-through of a source is treated as
#: that source (``W/read`` after a ``VariableV2`` is a variable read).
PASSTHROUGH_OPS: frozenset[str] = frozenset({"Identity", "Snapshot", "StopGradient", "PreventGradient"})

#: TensorFlow v1 control flow (``tf.while_loop``/``tf.cond`` lowered to frame ops). They carry a
#: loop's or a branch's values; every value that enters a loop must leave ``NextIteration`` in
#: the same dtype, so they keep their origin dtype and casts go around them, while the ops of
#: the loop body are planned like any other.
CONTROL_FLOW_OPS: frozenset[str] = frozenset({
    "Enter", "RefEnter", "Exit", "RefExit", "Switch", "RefSwitch", "Merge", "RefMerge",
    "NextIteration", "RefNextIteration", "LoopCond", "ControlTrigger",
})

#: TensorFlow ops whose float dtype is tied, through a list/array handle, to other ops that
#: create or read the same list (``element_dtype`` of ``TensorListReserve`` ... ``TensorListStack``):
#: changing one alone breaks the list, so they keep their origin dtype and casts go around them.
HANDLE_TYPED_PREFIXES: tuple[str, ...] = ("TensorList", "TensorArray", "Stack", "Queue", "Dataset", "Iterator")

#: Producers of a loop's back edge (``NextIteration`` -> ``Merge``): the edge is not a data
#: dependency for ordering the graph, so a loop is not a cycle for the planner.
BACK_EDGE_OPS: frozenset[str] = frozenset({"NextIteration", "RefNextIteration"})

#: Frame ops through which a loop's inputs enter it (a pass-through of a source stays a source).
ENTER_OPS: frozenset[str] = frozenset({"Enter", "RefEnter"})

#: Frame ops joining a loop's entering value with its back edge.
MERGE_OPS: frozenset[str] = frozenset({"Merge", "RefMerge"})

#: Ops whose outputs are their inputs' values rearranged: running them low loses nothing, so
#: a chain of them fed by constants (a reshaped bias) takes its readers' dtype and the cast
#: goes to the constant, ahead of time. Arithmetic on constants (a folded batch-norm scale)
#: stays in its origin dtype and is cast once.
DATA_MOVEMENT_OPS: frozenset[str] = frozenset({
    "Identity", "IdentityN", "Reshape", "Squeeze", "ExpandDims", "Unsqueeze", "Flatten", "Transpose",
    "TransposeD", "StridedSlice", "StridedSliceD", "Slice", "ConcatV2", "ConcatV2D", "Concat", "Pack",
    "Unpack", "Split", "SplitV", "SplitD", "Tile", "TileD", "BroadcastTo", "GatherV2", "Gather", "GatherNd",
    "Pad", "PadV2", "PadD", "MirrorPad", "Reverse", "ReverseV2", "Snapshot", "StopGradient",
})


#: Ops whose result is one of their inputs' values (or a comparison of them): running them low
#: rounds nothing that the cast after them would not round anyway. Only these (and the data
#: movement above) take a low dtype from their readers in the look-ahead pass; arithmetic
#: upstream of a white op (an input's normalisation) stays in its origin dtype, as TensorFlow
#: paints only its "clear" ops, not its "infer" ops, backwards from an allow op.
VALUE_PRESERVING_OPS: frozenset[str] = frozenset({
    "Relu", "Relu6", "MaxPool", "MaxPoolV2", "MaxPool3D", "MaxPoolV3", "Maximum", "Minimum", "ReduceMax",
    "ReduceMin", "Neg", "Abs", "Sign", "Floor", "Ceil", "Round", "ClipByValue", "Select", "SelectV2",
    "SpaceToBatchND", "BatchToSpaceND", "SpaceToDepth", "DepthToSpace", "ResizeNearestNeighborV2",
    "ReverseSequence", "TopKV2", "OnesLike", "ZerosLike", "Fill", "EnsureShape", "CheckNumerics",
})


__all__ = ["BACK_EDGE_OPS", "CONTROL_FLOW_OPS", "DATA_MOVEMENT_OPS", "ENTER_OPS", "HANDLE_TYPED_PREFIXES", "MERGE_OPS",
           "PASSTHROUGH_OPS", "SOURCE_KINDS", "VALUE_PRESERVING_OPS"]
