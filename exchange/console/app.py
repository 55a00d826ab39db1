"""The console's pages: each a URL (so a link can be sent to a colleague), each rendered
from the person's own node through `session.Person`, in the person's language.

Handlers that call the node are plain functions: Starlette runs them in its thread pool,
so a slow node never blocks the event loop. The live page's events come from the node's
FollowBlocks stream, read in a thread and pushed to the page as server-sent events.

Over 600 lines on purpose: the routes of every page in one place, so that each page's
URL, its checks (session, CSRF) and its template are read together.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import anyio.lowlevel
import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from exchange.client.crossquery import QuerySpec
from exchange.console.i18n import LANGUAGES, TIMEZONE_DEFAULT, Formats, choose, translator
from exchange.console.security import CSRF_FIELD, Gate, GateMiddleware
from exchange.console.session import ROWS_SHOWN_MAX, Person
from exchange.console.settings import PersonSettings
from exchange.errors import ExchangeError, MalformedInput
from exchange.identity.default_policies import LEGAL_BASIS_AML, LEGAL_BASIS_TAX_CRIME
from exchange.ids import parse_since
from exchange.ledger.queries import parse_subject_text
from exchange.lines import render as render_line
from exchange.v1 import node_pb2

HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(env=jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True))
STATIC_DIR = HERE / "static"
VENDOR_DIR = STATIC_DIR / "vendor"
BUNDLE_BYTES_MAX = 64 << 20
EVENTS_QUEUE_MAX = 1_000
LIVE_READERS_MAX = 8
KEEPALIVE_S = 15.0
PAGES = ("network", "ask", "cosign", "findings", "cases", "audit", "chain", "live",
         "evidence")
LEGAL_BASES = (LEGAL_BASIS_TAX_CRIME, LEGAL_BASIS_AML)
SEVERITIES = ("high", "medium", "low")
DEADLINE_S_DEFAULT = 3_600


class Console:
    """One console: its person (None for an evidence-only console) and its gate."""

    def __init__(self, person: Person | None, gate: Gate,
                 timezone: str = TIMEZONE_DEFAULT) -> None:
        self.person = person
        self.gate = gate
        self.timezone = timezone
        # the person's choices kept across restarts (an evidence-only console has none)
        self.settings = PersonSettings(person.profile_path.parent,
                                       f"{person.agency}/{person.subject}") \
            if person is not None else None
        # the live pages' readers of the node's block stream (each a thread until the
        # next block after its page closes), bounded
        self.live_readers = 0
        self.live_lock = threading.Lock()

    def need_person(self) -> Person:
        if self.person is None:
            raise HTTPException(404, "this console serves evidence only (no profile)")
        return self.person


def _lang(request: Request) -> str:
    override = request.query_params.get("lang")
    if override in LANGUAGES:
        return str(override)
    settings = console_of(request).settings
    if settings is not None and settings.language is not None:
        return settings.language
    return choose(request.state.browser.language)


def render(request: Request, template: str, status_code: int = 200,
           **context: Any) -> Response:
    console: Console = request.app.state.console
    language = _lang(request)
    fmt = Formats(language, console.timezone)
    person = console.person
    gettext = translator(language)
    response: Response = TEMPLATES.TemplateResponse(request, template, {
        "_": gettext, "line": lambda value: render_line(value, gettext), "lang": language,
        "languages": LANGUAGES, "fmt": fmt,
        "csrf": request.state.browser.csrf, "csrf_field": CSRF_FIELD, "person": person,
        "pages": PAGES if person is not None else ("evidence",),
        "here": request.url.path, "timezone": console.timezone, "here_full": _local(str(request.url.path) + (
            f"?{request.url.query}" if request.url.query else "")),
        **context}, status_code=status_code)
    return response


def _local(path: str) -> str:
    """A path on this console (never another site), for redirects after a form."""
    return path if path.startswith("/") and not path.startswith("//") else "/"


# how the client words every error that comes from the node (exchange.client.map_rpc_error)
NODE_ERROR_PREFIX = "node at "


def failure(request: Request, exc: Exception, status: int = 400) -> Response:
    """The error page; an error from the node keeps its own (English) words under a
    heading in the person's language."""
    error = str(exc)
    from_node = ""
    if isinstance(exc, ExchangeError) and error.startswith(NODE_ERROR_PREFIX):
        _address, _, rest = error.removeprefix(NODE_ERROR_PREFIX).partition(" ")
        from_node = "refused" if rest.startswith("refused:") else "said"
    return render(request, "error.html", status_code=status, error=error,
                  from_node=from_node)


def guarded(fn: Callable[[Request], Response]) -> Callable[[Request], Any]:
    """A sync handler whose domain errors become the error page (status 400)."""

    async def handler(request: Request) -> Response:
        try:
            return await run_in_threadpool(fn, request)
        except (ExchangeError, ValueError) as exc:
            return failure(request, exc)
    handler.__name__ = fn.__name__
    return handler


def console_of(request: Request) -> Console:
    return request.app.state.console  # type: ignore[no-any-return]


# -- network ----------------------------------------------------------------------------

def home(request: Request) -> Response:
    console = console_of(request)
    return RedirectResponse("/network" if console.person else "/evidence", status_code=303)


@guarded
def network(request: Request) -> Response:
    person = console_of(request).need_person()
    return render(request, "network.html", page="network", **person.network())


# -- ask --------------------------------------------------------------------------------

def _spec(form: Any) -> QuerySpec:
    subjects_text = str(form.get("subjects", ""))
    subjects = tuple(parse_subject_text(s.strip()) for s in subjects_text.replace(
        "\n", ",").split(",") if s.strip())
    fields = tuple(f.strip() for f in str(form.get("fields", "")).split(",") if f.strip())
    target, dataset = str(form.get("target", "")), str(form.get("dataset", ""))
    if "/" in dataset and not target:
        target, dataset = dataset.split("/", 1)
    if not target or not dataset:
        raise MalformedInput("choose the agency and the dataset asked")
    legal_basis = str(form.get("legal_basis", LEGAL_BASIS_TAX_CRIME))
    if legal_basis not in LEGAL_BASES:
        raise MalformedInput(f"legal basis {legal_basis!r} is not one of "
                             f"{', '.join(LEGAL_BASES)}")
    try:
        deadline_s = int(str(form.get("deadline_s", DEADLINE_S_DEFAULT)))
    except ValueError as exc:
        raise MalformedInput("the deadline is a number of seconds") from exc
    if not 60 <= deadline_s <= 7 * 86_400:
        raise MalformedInput("the deadline is between 60 s and 7 days")
    period = str(form.get("period", "")).strip() or None
    return QuerySpec(target=target, dataset=dataset, subjects=subjects, period=period,
                     case_id=str(form.get("case_id", "")).strip(),
                     purpose=str(form.get("purpose", "")).strip(), legal_basis=legal_basis,
                     fields=fields, deadline_s=deadline_s)


@guarded
def ask(request: Request) -> Response:
    person = console_of(request).need_person()
    catalog = person.client.list_catalog()
    entries = [e for e in catalog.entries if e.agency != person.agency]
    prefill = dict(request.query_params)
    return render(request, "ask.html", page="ask", entries=entries, prefill=prefill,
                  legal_bases=LEGAL_BASES, deadline_s=DEADLINE_S_DEFAULT)


async def ask_preview(request: Request) -> Response:
    form = await request.form()
    person = console_of(request).need_person()
    try:
        spec = _spec(form)
        preview = await run_in_threadpool(person.preview, spec)
    except (ExchangeError, ValueError) as exc:
        return failure(request, exc)
    return render(request, "ask_preview.html", page="ask", preview=preview,
                  form={k: str(v) for k, v in form.items() if k != CSRF_FIELD})


async def ask_submit(request: Request) -> Response:
    form = await request.form()
    person = console_of(request).need_person()
    try:
        spec = _spec(form)
        preview = await run_in_threadpool(person.preview, spec)
        if preview.needs_cosignature:
            view = await run_in_threadpool(person.request_cosignature, spec)
            return RedirectResponse(f"/cosign/{view.request_id}", status_code=303)
        qid = await run_in_threadpool(person.submit_query, spec)
    except (ExchangeError, ValueError) as exc:
        return failure(request, exc)
    return RedirectResponse(f"/queries/{qid.hex()}", status_code=303)


def _qid(request: Request) -> bytes:
    text = str(request.path_params["qid"])
    try:
        qid = bytes.fromhex(text)
    except ValueError as exc:
        raise MalformedInput(f"{text!r} is not a query id (64 hex digits)") from exc
    if len(qid) != 32:
        raise MalformedInput(f"{text!r} is not a query id (64 hex digits)")
    return qid


@guarded
def query_page(request: Request) -> Response:
    person = console_of(request).need_person()
    q, rows, total = person.answer_head(_qid(request), ROWS_SHOWN_MAX)
    columns = list(rows[0]) if rows else list(q.fields)
    return render(request, "query.html", page="ask", q=q, rows=rows, columns=columns,
                  more=total - len(rows))


@guarded
def query_status(request: Request) -> Response:
    person = console_of(request).need_person()
    q = person.query_view(_qid(request))
    return JSONResponse({"status": q.status, "rows": q.row_count})


@guarded
def query_csv(request: Request) -> Response:
    person = console_of(request).need_person()
    qid = _qid(request)
    person.query_view(qid)  # a clear error page before the download starts
    return StreamingResponse(person.answer_csv(qid), media_type="text/csv; charset=utf-8",
                             headers={"content-disposition":
                                      f'attachment; filename="query-{qid.hex()[:16]}.csv"'})


# -- four eyes ----------------------------------------------------------------------------

@guarded
def cosign_list(request: Request) -> Response:
    person = console_of(request).need_person()
    waiting = person.cosign_requests(mine=False) if person.is_supervisor else []
    mine = person.cosign_requests(mine=True)
    return render(request, "cosign.html", page="cosign", waiting=waiting, mine=mine,
                  parse=_body_of)


def _body_of(view: Any) -> Any:
    from exchange.client.cosign import parse_body

    return parse_body(view)


@guarded
def cosign_one(request: Request) -> Response:
    person = console_of(request).need_person()
    view = person.cosign_request(str(request.path_params["rid"]))
    mine = view.analyst == person.subject
    if mine and view.status == "cosigned" and person.sent_this(view):
        # the query this console showed and sent: signed now, as the analyst confirmed
        qid = person.complete(view)
        return RedirectResponse(f"/queries/{qid.hex()}", status_code=303)
    return render(request, "cosign_request.html", page="cosign", v=view,
                  q=_body_of(view).query, mine=mine)


async def cosign_submit(request: Request) -> Response:
    """The analyst signs a co-signed query this console did not send itself (it was
    restarted, or another of the person's consoles sent it) after reviewing it."""
    person = console_of(request).need_person()
    rid = str(request.path_params["rid"])
    try:
        view = await run_in_threadpool(person.cosign_request, rid)
        if view.analyst != person.subject:
            raise MalformedInput("only the analyst who asked signs the query")
        qid = await run_in_threadpool(person.complete, view)
    except ExchangeError as exc:
        return failure(request, exc)
    return RedirectResponse(f"/queries/{qid.hex()}", status_code=303)


@guarded
def cosign_status(request: Request) -> Response:
    person = console_of(request).need_person()
    view = person.cosign_request(str(request.path_params["rid"]))
    return JSONResponse({"status": view.status})


async def cosign_approve(request: Request) -> Response:
    person = console_of(request).need_person()
    rid = str(request.path_params["rid"])
    try:
        await run_in_threadpool(person.approve, rid)
    except ExchangeError as exc:
        return failure(request, exc)
    return RedirectResponse(f"/cosign/{quote(rid)}", status_code=303)


async def cosign_decline(request: Request) -> Response:
    person = console_of(request).need_person()
    rid = str(request.path_params["rid"])
    form = await request.form()
    try:
        await run_in_threadpool(person.decline, rid, str(form.get("reason", "")))
    except ExchangeError as exc:
        return failure(request, exc)
    return RedirectResponse(f"/cosign/{quote(rid)}", status_code=303)


# -- findings and cases -------------------------------------------------------------------

@guarded
def findings(request: Request) -> Response:
    person = console_of(request).need_person()
    p = request.query_params
    chosen = {k: p.get(k, "").strip() for k in ("rule", "period", "severity", "subject")}
    if chosen["subject"] and "=" in chosen["subject"]:
        chosen["subject"] = chosen["subject"].split("=", 1)[1]
    height, rows = person.findings(chosen["rule"], chosen["period"], chosen["severity"],
                                   chosen["subject"])
    rules = sorted({r.rule_id for r in person.client.list_rules().rules})
    return render(request, "findings.html", page="findings", height=height, rows=rows,
                  chosen=chosen, rules=rules, severities=SEVERITIES)


async def findings_open(request: Request) -> Response:
    person = console_of(request).need_person()
    form = await request.form()
    case_id = str(form.get("case_id", "")).strip()
    try:
        if not case_id:
            raise MalformedInput("name the case to open")
        await run_in_threadpool(person.open_case, str(form.get("finding", "")),
                                str(form.get("run", "")), case_id,
                                str(form.get("reason", "")))
    except (ExchangeError, ValueError) as exc:
        return failure(request, exc)
    return RedirectResponse(f"/cases/{quote(case_id)}", status_code=303)


@guarded
def cases(request: Request) -> Response:
    person = console_of(request).need_person()
    listing = person.cases()
    return render(request, "cases.html", page="cases", listing=listing)


@guarded
def case_page(request: Request) -> Response:
    person = console_of(request).need_person()
    case_id = str(request.path_params["case_id"])
    casefile, graph = person.case(case_id)
    return render(request, "case.html", page="cases", c=casefile, graph=graph,
                  timeline=casefile.timeline(messages=True), can_export=person.store_path() is not None)


@guarded
def case_graph(request: Request) -> Response:
    person = console_of(request).need_person()
    casefile, graph = person.case(str(request.path_params["case_id"]))
    rows_by_key: dict[str, list[dict[str, Any]]] = {}
    for q in casefile.queries:
        for row in q.get("rows") or []:
            for value in row.values():
                if isinstance(value, str) and len(rows_by_key.get(value, ())) < 20:
                    rows_by_key.setdefault(value, []).append(
                        {"dataset": q["dataset"], "query": q["tx"],
                         "row": {k: str(v) for k, v in row.items()}})
    return JSONResponse({"case": casefile.case_id, **graph, "rows": rows_by_key})


async def case_close(request: Request) -> Response:
    person = console_of(request).need_person()
    case_id = str(request.path_params["case_id"])
    form = await request.form()
    try:
        await run_in_threadpool(person.close_case, case_id, str(form.get("reason", "")))
    except ExchangeError as exc:
        return failure(request, exc)
    return RedirectResponse(f"/cases/{quote(case_id)}", status_code=303)


@guarded
def case_bundle(request: Request) -> Response:
    person = console_of(request).need_person()
    case_id = str(request.path_params["case_id"])
    data = person.export_case(case_id)
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in case_id)
    return Response(data, media_type="application/octet-stream", headers={
        "content-disposition": f'attachment; filename="case-{safe}.bundle"'})


# -- audit and chain ----------------------------------------------------------------------

@guarded
def audit(request: Request) -> Response:
    person = console_of(request).need_person()
    p = request.query_params
    chosen = {k: p.get(k, "").strip() for k in ("case", "subject", "analyst", "agency",
                                                "since")}
    if chosen["subject"]:
        parse_subject_text(chosen["subject"])
    verify = p.get("verify", "") == "1"
    req = node_pb2.AuditRequest(case_id=chosen["case"], subject=chosen["subject"],
                                analyst=chosen["analyst"], agency=chosen["agency"],
                                since_ms=parse_since(chosen["since"]) if chosen["since"]
                                else 0, limit=1_000)
    reply, checks = person.audit(req, verify)
    return render(request, "audit.html", page="audit", reply=reply, checks=checks,
                  chosen=chosen, verify=verify)


@guarded
def chain(request: Request) -> Response:
    person = console_of(request).need_person()
    below = int(request.query_params.get("below", "0") or 0)
    tip, blocks = person.blocks(below)
    return render(request, "chain.html", page="chain", tip=tip, blocks=blocks)


@guarded
def block_page(request: Request) -> Response:
    person = console_of(request).need_person()
    block = person.block(int(request.path_params["height"]))
    return render(request, "block.html", page="chain", b=block)


def tx_lookup(request: Request) -> Response:
    text = "".join(ch for ch in request.query_params.get("id", "") if ch in
                   "0123456789abcdefABCDEF")
    return RedirectResponse(f"/chain/tx/{text}", status_code=303)


@guarded
def tx_page(request: Request) -> Response:
    person = console_of(request).need_person()
    text = str(request.path_params["txid"])
    try:
        txid = bytes.fromhex(text)
    except ValueError as exc:
        raise MalformedInput(f"{text!r} is not a transaction id") from exc
    check = person.check_tx(txid)
    quorum = person.registry.quorum if person.registry else 0
    return render(request, "tx.html", page="chain", check=check, quorum=quorum,
                  kind=check.body.WhichOneof("kind") or "")


# -- live -----------------------------------------------------------------------------------

def live(request: Request) -> Response:
    console_of(request).need_person()
    return render(request, "live.html", page="live")


async def events(request: Request) -> Response:
    """Server-sent events: one `data:` line of JSON per event as its block commits."""
    console = console_of(request)
    person = console.need_person()
    with console.live_lock:
        if console.live_readers >= LIVE_READERS_MAX:
            return PlainTextResponse(f"at most {LIVE_READERS_MAX} live pages at once",
                                     status_code=503)
        console.live_readers += 1
    send, receive = anyio.create_memory_object_stream[dict[str, Any] | None](
        EVENTS_QUEUE_MAX)
    stop = threading.Event()
    token = anyio.lowlevel.current_token()

    def pump() -> None:
        try:
            for event in person.events(stop):
                anyio.from_thread.run(send.send, event, token=token)
                if stop.is_set():
                    break
        except (ExchangeError, anyio.BrokenResourceError, RuntimeError):
            pass
        finally:
            with console.live_lock:
                console.live_readers -= 1
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError,
                                     RuntimeError):
                anyio.from_thread.run(send.send, None, token=token)

    async def stream() -> AsyncIterator[bytes]:
        thread = threading.Thread(target=pump, daemon=True, name="console-events")
        thread.start()
        yield b": connected\n\n"
        try:
            while True:
                with anyio.move_on_after(KEEPALIVE_S) as scope:
                    event = await receive.receive()
                if scope.cancelled_caught:
                    yield b": keepalive\n\n"
                    continue
                if event is None:
                    return
                yield b"data: " + json.dumps(event, default=str,
                                             ensure_ascii=False).encode() + b"\n\n"
        finally:
            stop.set()
            receive.close()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"x-accel-buffering": "no"})


# -- evidence (no profile needed) -------------------------------------------------------------

def evidence(request: Request) -> Response:
    return render(request, "evidence.html", page="evidence", report=None, refused=None)


async def evidence_check(request: Request) -> Response:
    from exchange.ledger.evidence import BundleInvalid
    from exchange.ledger.report import build_report

    form = await request.form(max_part_size=BUNDLE_BYTES_MAX)
    upload = form.get("bundle")
    if not isinstance(upload, UploadFile):
        return failure(request, MalformedInput("choose a bundle file"))
    data = await upload.read(BUNDLE_BYTES_MAX + 1)
    if len(data) > BUNDLE_BYTES_MAX:
        return failure(request, MalformedInput(
            f"a bundle opened here is at most {BUNDLE_BYTES_MAX >> 20} MiB; "
            "verify a larger one with `exchange evidence report`"))
    name = upload.filename or "bundle"
    try:
        report = await run_in_threadpool(build_report, data, int(time.time() * 1000), name)
    except BundleInvalid as exc:
        return render(request, "evidence.html", page="evidence", report=None,
                      refused={"where": exc.where, "error": str(exc), "name": name},
                      status_code=422)
    except ExchangeError as exc:
        return render(request, "evidence.html", page="evidence", report=None,
                      refused={"where": "", "error": str(exc), "name": name},
                      status_code=422)
    return render(request, "evidence.html", page="evidence", report=report, refused=None)


# -- language ---------------------------------------------------------------------------------

async def language(request: Request) -> Response:
    form = await request.form()
    chosen = str(form.get("lang", ""))
    if chosen in LANGUAGES:
        request.state.browser.language = chosen
        settings = console_of(request).settings
        if settings is not None:
            try:
                await run_in_threadpool(settings.set_language, chosen)
            except OSError as exc:
                return failure(request, MalformedInput(
                    f"the language is chosen for this browser only: {exc}"))
    return RedirectResponse(_local(str(form.get("next", "/"))), status_code=303)


def vendor_static() -> StaticFiles:
    return StaticFiles(directory=str(VENDOR_DIR), check_dir=False)


def create_app(person: Person | None, gate: Gate, hosts: frozenset[str],
               timezone: str = TIMEZONE_DEFAULT) -> Starlette:
    """The console's ASGI app for one person (None: evidence only)."""
    routes = [
        Route("/", home),
        Route("/network", network),
        Route("/ask", ask),
        Route("/ask/preview", ask_preview, methods=["POST"]),
        Route("/ask/submit", ask_submit, methods=["POST"]),
        Route("/queries/{qid}", query_page),
        Route("/queries/{qid}/status", query_status),
        Route("/queries/{qid}/csv", query_csv),
        Route("/cosign", cosign_list),
        Route("/cosign/{rid}", cosign_one),
        Route("/cosign/{rid}/status", cosign_status),
        Route("/cosign/{rid}/approve", cosign_approve, methods=["POST"]),
        Route("/cosign/{rid}/decline", cosign_decline, methods=["POST"]),
        Route("/cosign/{rid}/submit", cosign_submit, methods=["POST"]),
        Route("/findings", findings),
        Route("/findings/open", findings_open, methods=["POST"]),
        Route("/cases", cases),
        Route("/cases/{case_id}", case_page),
        Route("/cases/{case_id}/graph", case_graph),
        Route("/cases/{case_id}/close", case_close, methods=["POST"]),
        Route("/cases/{case_id}/bundle", case_bundle),
        Route("/audit", audit),
        Route("/chain", chain),
        Route("/chain/blocks/{height:int}", block_page),
        Route("/chain/tx", tx_lookup),
        Route("/chain/tx/{txid}", tx_page),
        Route("/live", live),
        Route("/live/events", events),
        Route("/evidence", evidence),
        Route("/evidence", evidence_check, methods=["POST"]),
        Route("/lang", language, methods=["POST"]),
        Mount("/static/vendor", app=vendor_static(), name="vendor"),
        Mount("/static", app=StaticFiles(directory=str(STATIC_DIR)), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(GateMiddleware, gate=gate,
                                                          hosts=hosts)])
    app.state.console = Console(person, gate, timezone)

    async def not_found(request: Request, exc: Exception) -> Response:
        if not hasattr(request.state, "browser"):
            return PlainTextResponse(str(exc), status_code=404)
        detail = getattr(exc, "detail", str(exc))
        return failure(request, Exception(detail), status=getattr(exc, "status_code", 404))

    app.add_exception_handler(HTTPException, not_found)
    return app
