"""JSON log lines through structlog, each carrying the node, its term and height."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_node: Any = None


def bind_node(node: Any) -> None:
    global _node
    _node = node


def _add_node(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    node = _node
    if node is not None:
        event.setdefault("node", node.agency)
        event.setdefault("term", node.core.term)
        event.setdefault("height", node.store.height)
    return event


def configure(level: str = "info") -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_node,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
