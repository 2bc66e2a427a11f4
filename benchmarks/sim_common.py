"""Shared by the simulator benchmarks: the calibration, the result files, tables (paths: ``bench_env``).

Every simulator benchmark runs Llama-2-70B on 4 x H100-80GB (tensor parallel 4) as fitted to the
Splitwise profiling table (``router.cost_model.cost_model_from_splitwise``), with the KV capacity
of that instance from the datasheet (90% of 320 GB less the fp16 weights: 457,763 tokens), and
writes ``benchmarks/results/<name>_<date>.json`` and ``.png``.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path

from bench_env import RESULTS, SPLITWISE, machine


def calibration():
    from simulator.calibration import from_splitwise

    return from_splitwise(SPLITWISE, model="llama2-70b", hardware="h100-80gb", tensor_parallel=4)


def today() -> str:
    return datetime.date.today().isoformat()


def write(name: str, record: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}_{today()}.json"
    record = {"benchmark": name, "date": today(), "machine": machine(), **record}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def png(name: str, suffix: str = "") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}_{today()}{'_' + suffix if suffix else ''}.png"


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as text: columns are (key, header, format)."""
    widths = [max([len(h), *(len(format(r.get(k, ""), f)) for r in rows)]) for k, h, f in columns]

    def cell(text: str, fmt: str, width: int) -> str:
        return text.ljust(width) if not fmt else text.rjust(width)

    lines = ["  ".join(cell(h, f, w) for (_, h, f), w in zip(columns, widths))]
    for r in rows:
        lines.append("  ".join(cell(format(r.get(k, ""), f), f, w) for (k, _, f), w in zip(columns, widths)))
    return "\n".join(lines)
