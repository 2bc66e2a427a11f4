"""Output-length predictors replayed on real traces: Kendall tau-b of predictions against actual lengths.

Replays each trace in arrival order: every request is predicted on arrival; its actual length is
observed when it would have finished (arrival + 1 s + 30 ms per output token), not before, as in
a running router (``--feedback immediate`` observes right after predicting, an upper bound).

- Mooncake conversation trace (kvcache-ai/Mooncake, FAST'25): prompts carry prefix-block ids (512
  tokens per block), used as block hashes; only full blocks count, as the router hashes them.
- Azure LLM inference trace, conversation (Splitwise, ISCA'24): no prefix ids, so the default
  predictor can only use its prompt-length quantiles.

    python benchmarks/length_predictor.py [--traces /work/shared/traces] [--feedback delayed|immediate]

Prints a table and writes benchmarks/results/length_predictor_<date>.json.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import heapq
import json
import time
from pathlib import Path

import numpy as np

from router.length_predictor import (
    MedianPredictor,
    PrefixHistoryPredictor,
    PromptLengthRegression,
    RequestFeatures,
)

MOONCAKE_BLOCK_TOKENS = 512
PREDICTORS = {"prefix_history": PrefixHistoryPredictor, "median": MedianPredictor,
              "prompt_regression": PromptLengthRegression}


def kendall_tau_b(x, y, chunk: int = 1024) -> float:
    """Kendall's tau-b (ties in either variable corrected); nan when either variable is constant.

    Exact, O(n^2) in chunks: sum over all ordered pairs of sign(dx) * sign(dy) is 2 (C - D), and the
    sums of |sign(dx)| and |sign(dy)| are 2 (n0 - n1) and 2 (n0 - n2).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-d and of equal length")
    s = tx = ty = 0
    for start in range(0, len(x), chunk):
        sx = np.sign(x[start:start + chunk, None] - x[None, :]).astype(np.int8)
        sy = np.sign(y[start:start + chunk, None] - y[None, :]).astype(np.int8)
        s += int(np.sum(sx * sy, dtype=np.int64))
        tx += int(np.count_nonzero(sx))
        ty += int(np.count_nonzero(sy))
    if tx == 0 or ty == 0:
        return float("nan")
    return s / np.sqrt(float(tx) * float(ty))


def load_mooncake(path: Path) -> list[tuple[float, RequestFeatures, int]]:
    rows = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            full = r["input_length"] // MOONCAKE_BLOCK_TOKENS
            rows.append((r["timestamp"] / 1000.0,
                         RequestFeatures(r["input_length"], tuple(r["hash_ids"][:full])), r["output_length"]))
    rows.sort(key=lambda r: r[0])  # stable: equal timestamps keep file order
    return rows


def load_azure(path: Path) -> list[tuple[float, RequestFeatures, int]]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            t = datetime.datetime.fromisoformat(r["TIMESTAMP"][:26]).timestamp()
            rows.append((t, RequestFeatures(int(r["ContextTokens"])), int(r["GeneratedTokens"])))
    rows.sort(key=lambda r: r[0])
    return rows


def replay(rows, predictor, feedback: str) -> tuple[np.ndarray, np.ndarray]:
    """Predict each request on arrival; observe each when it finishes (or at once)."""
    predicted = np.empty(len(rows))
    actual = np.array([n for _, _, n in rows], dtype=np.float64)
    pending: list[tuple[float, int]] = []  # (finish time, index)
    for i, (arrival, features, n) in enumerate(rows):
        while pending and pending[0][0] <= arrival:
            _, j = heapq.heappop(pending)
            predictor.observe(rows[j][1], rows[j][2])
        predicted[i] = predictor.predict(features)
        if feedback == "immediate":
            predictor.observe(features, n)
        else:
            heapq.heappush(pending, (arrival + 1.0 + 0.03 * n, i))
    return predicted, actual


def main() -> None:
    # Imported here: tests load this file by path, without benchmarks/ on sys.path.
    from bench_env import AZURE_CONV, MOONCAKE, RESULTS, TRACES, machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=TRACES)
    parser.add_argument("--feedback", choices=("delayed", "immediate"), default="delayed")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    traces = {
        "mooncake_conversation": (load_mooncake, args.traces / MOONCAKE.relative_to(TRACES)),
        "azure_conv_2023": (load_azure, args.traces / AZURE_CONV.relative_to(TRACES)),
    }
    results: dict[str, dict] = {}
    print(f"{'trace':24s} {'predictor':18s} {'tau_b':>7s} {'MAE':>7s} {'median |err|':>12s}  notes")
    for trace, (load, path) in traces.items():
        rows = load(path)
        results[trace] = {"path": str(path), "num_requests": len(rows), "predictors": {}}
        for name, factory in PREDICTORS.items():
            predictor = factory()
            start = time.perf_counter()
            predicted, actual = replay(rows, predictor, args.feedback)
            elapsed = time.perf_counter() - start
            tau = kendall_tau_b(predicted, actual)
            err = np.abs(predicted - actual)
            entry = {"kendall_tau_b": round(tau, 4) if np.isfinite(tau) else None,
                     "mae_tokens": round(float(err.mean()), 1), "median_abs_err_tokens": float(np.median(err)),
                     "us_per_request": round(elapsed / len(rows) * 1e6, 2)}
            notes = ""
            if isinstance(predictor, PrefixHistoryPredictor):
                total = len(rows)
                entry.update(prefix_hit_rate=round(predictor.num_prefix_hits / total, 4),
                             session_hit_rate=round(predictor.num_session_hits / total, 4),
                             fallback_rate=round(predictor.num_fallbacks / total, 4))
                notes = (f"prefix hits {entry['prefix_hit_rate']:.1%}, "
                         f"quantile fallback {entry['fallback_rate']:.1%}")
            results[trace]["predictors"][name] = entry
            print(f"{trace:24s} {name:18s} {tau:7.4f} {entry['mae_tokens']:7.1f} "
                  f"{entry['median_abs_err_tokens']:12.1f}  {notes}")

    args.out.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().isoformat()
    record = {"benchmark": "length_predictor", "date": today, "machine": machine(), "numpy": np.__version__,
              "feedback": args.feedback, "results": results}
    out = args.out / f"length_predictor_{today}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
