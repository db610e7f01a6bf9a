"""The figures, one module each, in the order they run.

A figure module defines `FIGURE = Figure(key, figure_id, run, shared_server=...)`, where
`run(ctx)` measures and emits its rows (record.emit) and raises on failure; cli.py turns a
failure into a failed row and goes on with the next figure. To add a figure, add its module
name to MODULES.
"""

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

MODULES = [
    "f1_overhead",
    "f2_pickup",
    "f3_control",
    "f4b_guest_ingest",
    "f6_api_throughput",
    "f7_memory",
    "f8_scaling",
    "f9_warm_latency",
    "f10_debian_warm",
    "f11_warm_throughput",
    "f12_clone_memory",
    "f13_channel",
]


@dataclass
class Context:
    """What a figure is given: the command line's repetition settings and, for figures with
    `shared_server`, the `all` server they share."""

    quick: bool
    runs: Optional[int] = None  # --runs: N for the figures that take it (1 and 3)
    flood_mb: Optional[float] = None  # --flood-mb
    server: object = None  # server.Server, for figures with shared_server
    no_debian: bool = False  # --no-debian: figure 10 is skipped (with --quick only)

    def pick(self, quick, full):
        """`quick` with --quick, else `full`."""
        return quick if self.quick else full


@dataclass(frozen=True)
class Figure:
    key: str  # what --only selects ("4" selects 4b)
    figure: str  # its id in the results and in a failure row
    run: Callable[[Context], None]
    # Runs on the one `all` server that figures 1-4 share (started before the first of them,
    # stopped after the last), rather than starting servers of its own.
    shared_server: bool = False


REGISTRY = [importlib.import_module(f"{__name__}.{m}").FIGURE for m in MODULES]
