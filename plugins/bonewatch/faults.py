"""Fault points for `make faults`: the harness kills a real bonewatch process at a chosen point.

`BONEWATCH_FAULT="<point>"` (or `"<point>@<n>"`: the n-th time) makes `point(<point>)` send this
process SIGKILL, the one signal nothing can catch or clean up after, so the harness sees what a
power cut or an OOM kill leaves behind. Unset (always, outside the harness), `point` is one
dictionary lookup. The points:

    ingest.chunk      a chunk was handed to the store thread; more of the file is still to come
    ingest.ledger     the file's rows are written, its ledger row not yet (same transaction)
    evaluate.batch    a batch of patients' alerts is committed; the night's bookkeeping is not
    notify.claimed    a message is claimed; the SMTP server has not seen it
    notify.accepted   the SMTP server accepted a message; the outbox has not recorded it
"""

from __future__ import annotations

import os
import signal

POINTS = ("ingest.chunk", "ingest.ledger", "evaluate.batch", "notify.claimed", "notify.accepted")

_name, _, _nth = os.environ.get("BONEWATCH_FAULT", "").partition("@")
_remaining = int(_nth or 1) if _name else 0


def point(name: str) -> None:
    """Die here (SIGKILL) if the harness asked for this point and its count is reached."""
    global _remaining
    if name != _name:
        return
    _remaining -= 1
    if _remaining == 0:
        os.kill(os.getpid(), signal.SIGKILL)
