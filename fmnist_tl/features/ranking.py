"""Which measured extraction candidate to use: the fastest that passes the fidelity gate, ties broken by fidelity."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fmnist_tl.features.candidates import Candidate

log = logging.getLogger(__name__)

# Timings this close to the fastest are a tie: the probe's few batches differ by about this much from
# run to run. A tie goes to the most faithful candidate, then to the first in candidates()' order,
# so one machine makes one choice.
PROBE_NOISE = 0.05


def gate_failure(g: dict[str, Any]) -> str:
    """The gate's figures against its thresholds, for a warning line."""
    return (
        f"cosine to fp32 features: mean {g['mean_cosine']:.4f}, worst {g['worst_cosine']:.4f}; "
        f"need {g['thresholds']['mean']:.4f} / {g['thresholds']['worst']:.4f}"
    )


def break_tie(tied: list[str], gates: dict[str, dict[str, Any]], fixed_order: list[str]) -> tuple[str, dict[str, Any]]:
    """The candidate to use among `tied` (ids, fastest first, all passing the gate), and the record of the
    tie: the higher worst cosine to fp32 (fp32 itself, ungated, counts as 1), then the first in `fixed_order`."""

    def worst(cid: str) -> float:
        return gates[cid]["worst_cosine"] if cid in gates else 1.0

    best = max(worst(cid) for cid in tied)
    faithful = [cid for cid in tied if worst(cid) == best]
    winner = min(faithful, key=fixed_order.index)
    if len(faithful) == 1:
        by, reason = "fidelity", f"the most faithful wins (worst cosine to fp32 {best:.4f})"
    else:
        by, reason = "order", f"equally faithful, the first in the fixed order wins ({', '.join(fixed_order)})"
    return winner, {"within": PROBE_NOISE, "candidates": tied, "chosen": winner, "by": by, "reason": reason}


def rank(
    order: list[str],
    timings: dict[str, dict[str, Any]],
    by_id: dict[str, Candidate],
    gate: Callable[[Candidate], dict[str, Any]],
    precision: str,
) -> tuple[Candidate, str, dict[str, dict[str, Any]], dict[str, Any] | None]:
    """The candidate to use, why, the gate figures taken, and the tie record (None without a tie).

    `order`: candidate ids, fastest first; `gate` measures a reduced-precision candidate's fidelity.
    """
    gates: dict[str, dict[str, Any]] = {}
    rejected: list[str] = []  # failed the gate, faster than every passing candidate
    passing: list[str] = []  # the fastest passing candidate and those within PROBE_NOISE of it
    for cid in order:
        if passing and timings[cid]["img_per_s"] < (1 - PROBE_NOISE) * timings[passing[0]]["img_per_s"]:
            break
        c = by_id[cid]
        if c.reduced:
            gates[cid] = gate(c)
            if not gates[cid]["passed"]:
                if not passing:  # a tied candidate that fails is simply left out of the tie
                    log.warning(
                        "Extraction candidate %s fails the fidelity gate (%s); falling back to the next fastest",
                        cid,
                        gate_failure(gates[cid]),
                    )
                    rejected.append(cid)
                continue
        passing.append(cid)
    tie = None
    if not passing:
        # Only a reduced precision was allowed (features.precision=int8) and every variant of it
        # fails: obeyed, as a single explicit candidate is, with the most faithful variant.
        chosen = by_id[max(rejected, key=lambda cid: gates[cid]["mean_cosine"])]
        why = f"most faithful of {', '.join(rejected)}, all failing the fidelity gate; set explicitly, so used"
        log.warning("features.precision=%s: %s", precision, why)
    else:
        why = (
            "fastest measured"
            if not rejected
            else f"fastest that passes the fidelity gate ({', '.join(rejected)} failed)"
        )
        winner = passing[0]
        if len(passing) > 1:
            winner, tie = break_tie(passing, gates, list(by_id))
            failed = f"; {', '.join(rejected)} failed the fidelity gate" if rejected else ""
            why = f"{', '.join(passing)} measured within {PROBE_NOISE:.0%}, a tie: {tie['reason']}{failed}"
        chosen = by_id[winner]
    return chosen, why, gates, tie
