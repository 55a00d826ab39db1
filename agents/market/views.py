"""The market regulator offers no catalog view: its register is asked record by record."""

from __future__ import annotations

from typing import Any

from agents.common.view import View

VIEWS: dict[str, View[Any]] = {}
