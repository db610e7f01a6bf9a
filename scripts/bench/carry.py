"""Rows of an earlier BENCHMARKS.md that a partial run (`scripts/bench.sh --only ...`) did not
measure, kept with where they came from: each group says the run (date, commit, command, load)
that measured it, so no figure ever looks newer than it is. A full run carries nothing."""

import re

ROW = re.compile(r"^\| ([0-9]+[a-z0-9]*) \|")
NOTE = re.compile(r"^- \*\*([0-9]+[a-z0-9]*) ")
CARRIED = "## Figures carried over from earlier runs"
PROVENANCE = re.compile(r"^Measured (?:by|in) ")


def _previous_provenance(lines):
    """The previous file's own run, from its header table."""
    want = {"Date (UTC)": "date", "Commit": "commit", "Command": "command",
            "Machine load": "load", "Repetitions": "mode"}
    got = {}
    for line in lines:
        m = re.match(r"^\| (.+?) \| (.*) \|$", line)
        if m and m.group(1) in want:
            got[want[m.group(1)]] = m.group(2)
        if line.startswith("## Results"):
            break
    return (f"Measured in the run of {got.get('date', '?')} (commit {got.get('commit', '?')}, "
            f"{got.get('command', '?')}; {got.get('mode', '?')}); machine load: "
            f"{got.get('load', '?')}.")


def carried(previous_md, measured):
    """[(provenance, table rows, note lines)] of `previous_md`'s figures not in `measured`
    (a set of figure ids such as "4b", "13a"), grouped by the run that measured them."""
    try:
        with open(previous_md) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    current = [_previous_provenance(lines), [], []]
    groups = [current]  # [provenance, rows, notes]
    by_figure = {}
    in_carried = False
    for line in lines:
        if line.startswith(CARRIED):
            in_carried, current = True, None
            continue
        if in_carried and PROVENANCE.match(line):
            current = [line, [], []]
            groups.append(current)
            continue
        if current is None:
            continue
        m = ROW.match(line)
        if m and m.group(1) not in measured:
            current[1].append(line)
            by_figure.setdefault(m.group(1), current)
            continue
        n = NOTE.match(line)
        if n and n.group(1) not in measured and n.group(1) in by_figure:
            by_figure[n.group(1)][2].append(line)
    return [(p, rows, notes) for p, rows, notes in groups if rows]


def render_carried(groups):
    """Markdown for the carried groups (empty when there are none)."""
    if not groups:
        return []
    out = ["", CARRIED, "",
           "This run measured only some figures; these rows are from earlier runs, as they "
           "were recorded then.", ""]
    for provenance, rows, notes in groups:
        out.append(provenance)
        out.append("")
        out.append("| # | figure | median | min | max | runs | target | met |")
        out.append("|---|---|---|---|---|---|---|---|")
        out.extend(rows)
        out.append("")
        out.extend(notes)
        out.append("")
    return out
