"""The one call users make: ``plan(graph, config)``."""

from __future__ import annotations

from pathlib import Path

from precision_policy.config import RunConfig
from precision_policy.graph import OpGraph, load_graph
from precision_policy.plan import CastPlan


def plan(graph: OpGraph | str | Path, config: RunConfig | None = None, **settings: object) -> CastPlan:
    """Plan ``graph`` (an OpGraph or a graph JSON path) under ``config``.

    Keyword settings build a RunConfig when none is given:
    ``plan(g, precision_mode="force_fp16", op_info="ascend910")``.

    Example:
        >>> import precision_policy as pp
        >>> p = pp.plan("examples/graphs/conv2d_bias_relu.json", precision_mode="allow_mix_precision")
        >>> p["myConv"].dtype
        'float16'
    """
    if config is None:
        config = RunConfig(**settings)  # type: ignore[arg-type]
    elif settings:
        config = config.model_copy(update=settings)
        config = RunConfig(**config.model_dump())
    if not isinstance(graph, OpGraph):
        graph = load_graph(graph)
    library = config.library()
    overrides = config.overrides(library)
    return config.mode.plan(
        graph,
        library,
        overrides,
        keep_output_dtype=config.keep_output_dtype,
        config_summary=config.summary(),
        gray_disagreement=config.gray_disagreement,
    )
