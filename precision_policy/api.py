"""The one call users make: ``plan(graph, config)``."""

from __future__ import annotations

import difflib
from pathlib import Path

from precision_policy.config import RunConfig
from precision_policy.errors import ConfigError, GraphError, OverrideError
from precision_policy.graph import OpGraph, load_graph
from precision_policy.modes.planner import plan as plan_graph
from precision_policy.plan import CastPlan


def check_override_names(graph: OpGraph, overrides: object) -> None:
    """A keep_dtype or customize_dtypes line naming a node the graph does not have is an error."""
    names = set(graph.names)
    wanted = [(name, where) for name, where in getattr(overrides, "keep_names", {}).items()]
    wanted += [(name, spec.where) for name, spec in getattr(overrides, "custom_names", {}).items()]
    for name, where in wanted:
        if name in names:
            continue
        file, _, line = where.rpartition(":")
        close = difflib.get_close_matches(name, graph.names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else (
            "; names are the graph's node names (torch: module paths such as 'layer1.0.conv1')")
        raise OverrideError(f"{name!r} matches no node of graph {graph.name!r}{hint}",
                            file=file or where, line=int(line) if line.isdigit() else None)


def plan(graph: OpGraph | str | Path, config: RunConfig | None = None, **settings: object) -> CastPlan:
    """Plan ``graph`` (an OpGraph or a graph JSON path) under ``config``.

    Keyword settings build a RunConfig when none is given:
    ``plan(g, precision_mode="force_fp16", op_info="ascend910")``, and override ``config``'s
    settings when one is; an unknown keyword is a :class:`~precision_policy.errors.ConfigError`
    either way.

    Example:
        >>> import precision_policy as pp
        >>> p = pp.plan("examples/graphs/conv2d_bias_relu.json", precision_mode="allow_mix_precision")
        >>> p["myConv"].dtype
        'float16'
        >>> pp.plan("examples/graphs/conv2d_bias_relu.json", pp.RunConfig(), precison_mode="force_fp16")
        Traceback (most recent call last):
        ...
        precision_policy.errors.ConfigError: RunConfig.precison_mode: unknown setting; did you mean 'precision_mode'? ...
    """
    if config is not None and not isinstance(config, RunConfig):
        raise ConfigError(f"plan: config must be a RunConfig, not {type(config).__name__} (settings go in keywords: "
                          "plan(graph, precision_mode=...))")
    if not isinstance(graph, (OpGraph, str, Path)):
        raise GraphError(f"plan: graph must be an OpGraph or a path to a graph file, not {type(graph).__name__}; "
                         "framework models go through their backend (precision_policy.torch.trace, "
                         "precision_policy.tensorflow.to_opgraph)")
    if config is None:
        config = RunConfig(**settings)
    elif settings:
        # validated as a whole, as a new RunConfig: a misspelt keyword is a ConfigError naming the closest
        # setting (model_copy(update=...) would drop it silently and plan with the config unchanged)
        base = config.model_dump(exclude_unset=True)
        if {"precision_mode", "precision_mode_v2"} & settings.keys():  # a mode given here replaces the config's
            base.pop("precision_mode", None)
            base.pop("precision_mode_v2", None)
        config = RunConfig(**{**base, **settings})
    if not isinstance(graph, OpGraph):
        graph = load_graph(graph)
    library = config.library()
    overrides = config.overrides(library, env_lists_default=graph.env_lists)
    check_override_names(graph, overrides)
    return plan_graph(
        config.mode,
        graph,
        library,
        overrides,
        keep_output_dtype=config.keep_output_dtype,
        config_summary=config.summary(),
        gray_disagreement=config.gray_disagreement,
    )
