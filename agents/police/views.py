"""police offers no catalog view in the contract; its records stay its own input."""

from __future__ import annotations

from typing import Any

from agents.common.view import View

VIEWS: dict[str, View[Any]] = {}
