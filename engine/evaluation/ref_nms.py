"""Ref-NMS Table 1 in Markdown: the rows of :func:`engine.protocols.ref_nms.evaluate_ref_proposals`
(the protocol is described there and in ``docs/ref-nms.md``)."""
from __future__ import annotations

from collections.abc import Sequence

from engine.protocols.ref_nms import ProposalRow

__all__ = ["rows_to_markdown"]


def rows_to_markdown(rows: Sequence[ProposalRow]) -> str:
    """Table 1 layout: one line per method, referent and context recall per N."""
    settings = list(dict.fromkeys(r.n for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    table = {(r.method, r.n): r for r in rows}
    head = "| method | " + " | ".join(f"ref N={n}" for n in settings) + " | " + " | ".join(f"ctx N={n}" for n in settings) + " |"
    lines = [head, "| --- |" + " ---: |" * (2 * len(settings))]
    for m in methods:
        refs = " | ".join(f"{table[(m, n)].referent_recall:.2f}" for n in settings)
        ctxs = " | ".join(f"{table[(m, n)].context_recall:.2f}" for n in settings)
        lines.append(f"| {m} | {refs} | {ctxs} |")
    real = table.get((methods[0], "real"))
    note = f"\n(real: {real.boxes:.2f} boxes per expression on average)\n" if real is not None else "\n"
    return "\n".join(lines) + note
