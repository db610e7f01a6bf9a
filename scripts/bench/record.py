"""Figure rows: one JSON object per line on stdout,
  {"figure", "name", "unit", "median", "min", "max", "runs", "target", "ok", "note"}
(optionally "detail": a small table for the notes; "others": [samples with other people's
heavy processes running, samples] while the figure ran), and a RESULT line on stderr."""

import json
import time

from .common import log, med
from .procstat import OthersSampler

_SAMPLER = None


def start_sampling():
    """Starts sampling other people's heavy processes; rows emitted from now on say whether
    any ran during their figure."""
    global _SAMPLER
    _SAMPLER = OthersSampler()
    _SAMPLER.start()


def begin_figure():
    """Rows emitted from now on count other people's processes from this moment."""
    if _SAMPLER is not None:
        _SAMPLER.window_start = time.time()


def emit(figure, name, unit, values, target=None, ok=None, note=None, detail=None, digits=3,
         median=None):
    vals = [v for v in values if v is not None]

    def r(x):
        return None if x is None else round(x, digits)

    row = {
        "figure": figure,
        "name": name,
        "unit": unit,
        "median": r(median if median is not None else med(vals)),
        "min": r(min(vals)) if vals else None,
        "max": r(max(vals)) if vals else None,
        "runs": len(vals),
        "target": target,
        "ok": ok,
        "note": note,
    }
    if detail:
        row["detail"] = detail
    if _SAMPLER is not None:
        busy, total = _SAMPLER.window()
        row["others"] = [busy, total]
        if busy:
            row["note"] = ((row["note"] + " ") if row["note"] else "") + (
                f"(Not quiet: other people's cargo/rustc/QEMU processes ran during {busy} of "
                f"{total} 2-s samples of this figure.)")
    print(json.dumps(row), flush=True)
    log(f"RESULT {figure} {name}: median {row['median']} {unit} "
        f"(min {row['min']}, max {row['max']}, n={row['runs']}) target {target} ok={ok}")
    return row
