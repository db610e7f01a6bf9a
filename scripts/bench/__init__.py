"""End-to-end benchmarks of sqlite-sim with the real release binary and real QEMU (issue 6).

`scripts/bench_vm.py` is the entry point (`scripts/bench.sh` runs it); this package holds the
code, one module per concern:

  common.py    paths, logging, medians, and the registry of everything started (cleanup at exit)
  http.py      keep-alive HTTP/1.1 client for one server, with the API's shortcuts
  server.py    one sqlite-sim deployment in a temp dir: start, find its port, stop; run traces
  qemu.py      plain QEMU driven like the agent does (QMP, console), the raw baseline
  procstat.py  /proc readings (CPU, RSS, context switches) and `perf` profiles
  record.py    one JSON line per figure row on stdout, marked when others shared the CPUs
  render.py    BENCHMARKS.md from collected JSON lines
  cli.py       arguments, the shared `all` server, running the selected figures
  figures/     one module per figure, listed in figures/__init__.py

Adding a figure: write `figures/fNN_name.py` defining `FIGURE = Figure(...)` and add its module
name to `MODULES` in figures/__init__.py.

Standard library only.
"""
