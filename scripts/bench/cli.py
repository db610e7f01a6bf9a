"""The command line: run the selected figures (one JSON line per figure row on stdout), or
render collected rows into BENCHMARKS.md."""

import argparse
import os
import sys
import traceback

from . import __doc__ as PACKAGE_DOC
from . import record
from .common import BIN, install_cleanup, log
from .figures import REGISTRY, Context
from .render import render
from .server import Server

DESCRIPTION = """\
End-to-end benchmarks of sqlite-sim with the real release binary and real QEMU (issue 6).

Measures figures 1, 2, 3, 4b, 6, 7 and 8 (issue 6), 9-12 (warm start, issue 11) and 13 (the guest channel, issue 12) of
BENCHMARKS.md (4a and 5 come from
`cargo bench --bench hot_paths`). Every server runs in its own temporary directory with its
own database and run directory, on a kernel-chosen port, and is stopped with SIGTERM.

Output: one JSON object per line on stdout, one per figure row:
  {"figure", "name", "unit", "median", "min", "max", "runs", "target", "ok", "note"}
(optionally "detail": a small table for the notes). Progress goes to stderr.

`--render RESULTS --meta META` turns collected JSON lines into BENCHMARKS.md (used by
scripts/bench.sh).
"""


def parse_args(argv):
    keys = ",".join(f.key for f in REGISTRY)
    ap = argparse.ArgumentParser(prog="bench_vm.py", description=DESCRIPTION,
                                 epilog=PACKAGE_DOC.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny repetitions (a smoke run)")
    ap.add_argument("--only", default=keys,
                    help=f"comma-separated figures to run (default: all of {keys})")
    ap.add_argument("--flood-mb", type=float, default=None,
                    help="MB the guest prints for figure 4b (default 100; 2 with --quick). "
                         "The TCG serial port moves ~0.1-0.3 MB/s: 100 MB takes 10+ minutes.")
    ap.add_argument("--no-debian", action="store_true",
                    help="with --quick: skip figure 10 (the Debian 12 guest), e.g. when its "
                         "image cannot be built here; a full run always includes it")
    ap.add_argument("--runs", type=int, default=None, help="override N for figures 1 and 3")
    ap.add_argument("--render", metavar="RESULTS", help="render BENCHMARKS.md from JSON lines")
    ap.add_argument("--meta", metavar="FILE", help="KEY=VALUE lines for --render")
    ap.add_argument("--table-out", metavar="FILE", help="with --render: also write the table")
    ap.add_argument("--previous", metavar="MD",
                    help="with --render: keep this earlier BENCHMARKS.md's figures that the "
                         "results do not hold (a partial run), each with the run it came from")
    a = ap.parse_args(argv)
    if a.no_debian and not a.quick:
        ap.error("--no-debian is for --quick runs: a full run includes the Debian 12 figure")
    return a


def run_figure(fig, ctx, failures):
    """Runs one figure; a failure becomes a failed row and the run goes on."""
    record.begin_figure()
    try:
        fig.run(ctx)
    except Exception as e:  # noqa: BLE001 - report and carry on with the other figures
        log(f"figure {fig.figure} FAILED: {e!r}")
        traceback.print_exc()
        failures.append(fig.figure)
        record.emit(fig.figure, f"figure {fig.figure}", "", [], ok=False,
                    note=f"benchmark failed: {e}")


def main(argv=None):
    a = parse_args(argv)
    if a.render:
        md, table = render(a.render, a.meta, a.previous)
        sys.stdout.write(md)
        if a.table_out:
            with open(a.table_out, "w") as f:
                f.write(table + "\n")
        return 0

    only = {x.strip() for x in a.only.split(",") if x.strip()}
    selected = [f for f in REGISTRY if f.key in only]
    if not os.access(BIN, os.X_OK):
        log(f"{BIN} not found: run `cargo build --release` first")
        return 2
    install_cleanup()
    record.start_sampling()

    ctx = Context(quick=a.quick, runs=a.runs, flood_mb=a.flood_mb, no_debian=a.no_debian)
    # The figures that share the `all` server run on one, started before the first of them
    # and stopped after the last, so that it is gone before the others start their own.
    shared = [f for f in selected if f.shared_server]
    failures = []
    for fig in selected:
        if fig.shared_server and ctx.server is None:
            ctx.server = Server(label="all")
            ctx.server.spawn("all")
        run_figure(fig, ctx, failures)
        if ctx.server is not None and fig is shared[-1]:
            ctx.server.stop()
            ctx.server = None
    if failures:
        log(f"failed figures: {', '.join(failures)}")
        return 1
    return 0
