#!/usr/bin/env python3
"""End-to-end benchmarks of sqlite-sim with the real release binary and real QEMU: figures 1,
2, 3, 4b, 6, 7 and 8 of BENCHMARKS.md, one JSON line per figure row on stdout; or, with
`--render`, BENCHMARKS.md from such lines. scripts/bench.sh runs it; the code is the package
scripts/bench/ (`--help` lists its modules). Standard library only."""

import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ left in scripts/bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench.cli import main  # noqa: E402 - after the path set-up

if __name__ == "__main__":
    sys.exit(main())
