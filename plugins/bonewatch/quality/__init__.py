"""Data-quality expectations (Great Expectations Core 1.x), built in code."""

from __future__ import annotations

import os

# Earlier GX Core 1.x releases sent usage statistics unless this variable, read when GX is
# imported, said no; the pinned release has no such code. A hospital system sends nothing to
# anyone: off, whatever the environment says (and every context says so too: `gx_context`).
os.environ["GX_ANALYTICS_ENABLED"] = "false"


def gx_context(mode: str, **kwargs):
    """A GX context (`gx.get_context(mode=..., **kwargs)`) with usage statistics off."""
    import great_expectations as gx

    context = gx.get_context(mode=mode, **kwargs)
    context.enable_analytics(False)
    return context
