"""What both deployment modules share: the SMTP catcher in this process, started once a module."""

from __future__ import annotations

import pytest

from bonewatch.notify.catcher import MailCatcher


@pytest.fixture(scope="module")
def smtp():
    with MailCatcher() as catcher:
        yield catcher
