"""The architecture diagram, drawn from the deployment's own description.

`python -m helm.diagram` (or `make diagram`) reads the chart's values, the eksctl cluster, the
monitoring files, the committed Triton config and perf/RESULTS.md, and renders
docs/images/architecture.svg and .png with Graphviz's `dot`.
"""

from helm.diagram.render import (
    SEED_CLAIMS,
    Architecture,
    Component,
    Flow,
    PerfRow,
    build_architecture,
    load_values,
    parse_results,
    render,
    to_dot,
)

__all__ = [
    "SEED_CLAIMS",
    "Architecture",
    "Component",
    "Flow",
    "PerfRow",
    "build_architecture",
    "load_values",
    "parse_results",
    "render",
    "to_dot",
]
