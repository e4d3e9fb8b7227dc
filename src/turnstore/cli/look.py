"""Looking at conversations: ``show``, ``tree``, ``search`` and ``usage``.

Each command reads only. On a terminal the output is drawn with rich (tables, a tree, bars);
in a pipe it is plain text, one record a line; ``--json`` prints one document whose shape the
command's help documents (keys are only ever added).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, TypeVar

import typer
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from turnstore import cost
from turnstore.cli import common
from turnstore.cli.db import _require_existing_sqlite_file, run_on_database
from turnstore.errors import (
    BranchNotFoundError,
    InvalidArgumentError,
    MissingExtraError,
    SessionNotFoundError,
    TurnNotFoundError,
)
from turnstore.lineage import BranchNode
from turnstore.persistence import engines
from turnstore.search import SearchPage
from turnstore.session import AdvancedSession
from turnstore.store import Store
from turnstore.usage_report import UsageRow, check_group_by

T = TypeVar("T")

SHOW_EPILOG = (
    "JSON shape: {session_id, branch, turns: [{turn, items: [the stored items], usage: "
    "{requests, input_tokens, output_tokens, total_tokens} | null, models: [{model, requests, "
    "input_tokens, cached_tokens, output_tokens, reasoning_tokens, total_tokens}], cost_usd, "
    "cost_reason}]}."
)
TREE_EPILOG = (
    "JSON shape: {session_id, current_branch, branches: [root nodes]}; a node is {branch_id, "
    "parent_branch_id, fork_turn, fork_preview, origin (root|recorded|inferred|unknown), note, "
    "message_count, user_turns, total_tokens, is_current, created_at, children: [nodes]}."
)
SEARCH_EPILOG = (
    "JSON shape: {hits: [{session_id, message_id, branches, turn, kind, snippet, created_at}], "
    "next_cursor}. A page may hold fewer hits than --limit while more follow: go on while "
    "next_cursor is not null."
)
USAGE_EPILOG = (
    "JSON shape: {group_by, since, until, tz, rows: [{period, model, user, session, branch, "
    "turns, requests, input_tokens, cached_tokens, output_tokens, reasoning_tokens, "
    "total_tokens, cost_usd, cost_reason}], totals: {the same keys}}. cost_usd is null, with "
    "cost_reason, when any turn of the row cannot be priced (unknown model, no price, or no "
    "cost extra)."
)


def register(app: typer.Typer) -> None:
    """Add ``show``, ``tree``, ``search`` and ``usage`` to ``app``."""
    app.command(name="show", epilog=f"{SHOW_EPILOG} {common.EXIT_CODES_HELP}")(show)
    app.command(name="tree", epilog=f"{TREE_EPILOG} {common.EXIT_CODES_HELP}")(tree)
    app.command(name="search", epilog=f"{SEARCH_EPILOG} {common.EXIT_CODES_HELP}")(search_cmd)
    app.command(name="usage", epilog=f"{USAGE_EPILOG} {common.EXIT_CODES_HELP}")(usage_cmd)


# -- plumbing ------------------------------------------------------------------------------


def _run(url: str, work: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        try:
            return await work()
        finally:
            await engines.dispose_engines()

    return run_on_database(url, main)


def _checked_url(url: str | None) -> str:
    target = common.resolve_url(url)
    try:
        make_url(target)
    except ArgumentError as exc:
        raise InvalidArgumentError(f"Malformed database URL: {common.one_line(exc)}") from exc
    _require_existing_sqlite_file(target)
    return target


def _store(url: str) -> Store:
    return Store(url=url)


async def _open_session(url: str, session_id: str, branch: str | None) -> AdvancedSession:
    session = AdvancedSession(session_id=session_id, url=url)
    branches = [info["branch_id"] for info in await session.list_branches()]
    if not branches:
        raise SessionNotFoundError(f"No session {session_id!r} in this database")
    if branch is not None and branch not in branches:
        raise BranchNotFoundError(
            f"Session {session_id!r} has no branch {branch!r}; it has {', '.join(branches)}"
        )
    return session


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def _usd(value: Decimal | None) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "$0"
    return f"${value:.6f}" if value < Decimal("0.01") else f"${value:,.4f}"


def _float(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def _price_updates(enabled: bool) -> Any:
    """Price updates when asked for (``--update-prices``): a network call to genai-prices."""
    if not enabled:
        return None
    if not cost.available():
        raise MissingExtraError(
            "--update-prices needs the cost extra: pip install 'turnstore[cost]'"
        )
    from genai_prices import UpdatePrices

    updater = UpdatePrices()
    updater.start(wait=30)
    return updater


SessionArgument = Annotated[
    str, typer.Argument(help="The session id, exactly as stored. Example: demo", show_default=False)
]


# -- show ----------------------------------------------------------------------------------


def show(
    session_id: SessionArgument,
    branch: Annotated[
        str | None,
        typer.Option(
            "--branch", "-b", help="Branch to show (default: main). Example: --branch alt"
        ),
    ] = None,
    turn: Annotated[
        int | None,
        typer.Option(
            "--turn", "-t", min=1, help="Show only this user turn (from 1). Example: --turn 2"
        ),
    ] = None,
    url: common.UrlOption = None,
    as_json: common.JsonOption = False,
) -> None:
    """Show a conversation: user and assistant text, tool calls, tokens and cost per turn.

    Example: turnstore show demo --branch weather_focus --url sqlite+aiosqlite:///turnstore-demo.db
    """
    target = _checked_url(url)

    async def work() -> dict[str, Any]:
        session = await _open_session(target, session_id, branch)
        chosen = branch or "main"
        by_turn = await session.get_items_by_turn(chosen)
        usage_rows = await session.get_turn_usage(branch_id=chosen)
        assert isinstance(usage_rows, list)
        costs = await session.get_turn_costs(chosen)
        await session.aclose()
        usage_by_turn = {row["user_turn_number"]: row for row in usage_rows}
        if turn is not None and turn not in by_turn:
            raise TurnNotFoundError(f"Branch {chosen!r} of {session_id!r} has no turn {turn}")
        turns = []
        for number, items in sorted(by_turn.items()):
            if turn is not None and number != turn:
                continue
            spent = usage_by_turn.get(number)
            priced = costs.get(number, {})
            turns.append(
                {
                    "turn": number,
                    "items": items,
                    "usage": None
                    if spent is None
                    else {
                        key: spent[key]
                        for key in ("requests", "input_tokens", "output_tokens", "total_tokens")
                    },
                    "models": priced.get("models", []),
                    "cost_usd": _float(priced.get("cost_usd")),
                    "cost_reason": priced.get("cost_reason"),
                }
            )
        return {"session_id": session_id, "branch": chosen, "turns": turns}

    data = _run(target, work)
    common.emit(data, lambda: _print_conversation(data), as_json=as_json)


def _print_conversation(data: dict[str, Any]) -> None:
    terminal = common.is_terminal(sys.stdout)
    console = _console() if terminal else None
    for turn in data["turns"]:
        header = f"turn {turn['turn']}"
        if turn["usage"] is not None:
            models = ", ".join(m["model"] or "unknown model" for m in turn["models"])
            header += f" · {turn['usage']['total_tokens']} tokens"
            header += f" · {models}" if models else ""
            cost_usd = turn["cost_usd"]
            header += f" · {_usd(None if cost_usd is None else Decimal(str(cost_usd)))}"
        if console is not None:
            from rich.markup import escape

            # A model name is stored text: rich must not read markup in it.
            console.rule(escape(common.printable(header)), align="left", style="dim")
        else:
            common.line(f"== {header}")
        for item in turn["items"]:
            who, text = _describe(item)
            if console is not None:
                from rich.text import Text

                line = Text()
                line.append(f"{who}: ", style=_STYLES.get(who, "bold"))
                line.append(text)
                console.print(line)
            else:
                common.line(f"{who}: {text}")


_STYLES = {"user": "bold cyan", "assistant": "bold green", "tool call": "bold magenta"}


def _describe(item: Any) -> tuple[str, str]:
    """Who speaks in an item, and what a person reads of it, on one line."""
    if not isinstance(item, dict):
        return "item", json.dumps(item, ensure_ascii=False)
    role, kind = item.get("role"), item.get("type")
    if role in ("user", "assistant", "system", "developer"):
        return str(role), _flat(_text_of(item.get("content")))
    if kind in ("function_call", "custom_tool_call"):
        arguments = item.get("arguments", item.get("input", ""))
        return "tool call", f"{item.get('name', '?')}({_flat(str(arguments))})"
    if isinstance(kind, str) and kind.endswith("_output"):
        output = item.get("output")
        text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
        return "tool output", _flat(text)
    if kind == "reasoning":
        return "reasoning", _flat(_text_of(item.get("summary")))
    return str(kind or "item"), _flat(json.dumps(item, ensure_ascii=False))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", part.get("refusal", "")))
            for part in content
            if isinstance(part, dict)
        )
    return "" if content is None else json.dumps(content, ensure_ascii=False)


def _flat(text: str) -> str:
    return common.printable(" ".join(text.split()))


# -- tree ----------------------------------------------------------------------------------


def tree(
    session_id: SessionArgument,
    url: common.UrlOption = None,
    as_json: common.JsonOption = False,
) -> None:
    """Draw a session's branch tree: fork turns, items, turns and tokens per branch.

    Branches made by the SDK's class (or before turnstore recorded lineage) show the parent
    inferred from the items they share, marked "inferred", or "unknown" when it cannot be told.

    Example: turnstore tree demo --url sqlite+aiosqlite:///turnstore-demo.db
    """
    target = _checked_url(url)

    async def work() -> tuple[list[BranchNode], str]:
        session = await _open_session(target, session_id, None)
        roots = await session.branch_tree()
        await session.aclose()
        current = next((n.branch_id for n in _walk(roots) if n.is_current), "main")
        return roots, current

    roots, current = _run(target, work)
    data = {
        "session_id": session_id,
        "current_branch": current,
        "branches": [root.to_dict() for root in roots],
    }
    common.emit(data, lambda: _print_tree(session_id, roots), as_json=as_json)


def _walk(nodes: list[BranchNode]) -> list[BranchNode]:
    found = []
    for node in nodes:
        found += [node, *_walk(node.children)]
    return found


def _node_label(node: BranchNode) -> str:
    parts = [common.shown_id(node.branch_id)]
    if node.fork_turn is not None:
        preview = (
            f" {json.dumps(node.fork_preview, ensure_ascii=False)}" if node.fork_preview else ""
        )
        parts.append(f"forked before turn {node.fork_turn}{preview}")
    parts.append(f"{node.message_count} items, {node.user_turns} turns, {node.total_tokens} tokens")
    if node.origin in ("inferred", "unknown"):
        parts.append(f"[{node.origin}: {node.note}]")
    elif node.note:
        parts.append(f"[{node.note}]")
    if node.is_current:
        parts.append("(current)")
    return common.printable(" · ".join(parts))


def _print_tree(session_id: str, roots: list[BranchNode]) -> None:
    if common.is_terminal(sys.stdout):
        from rich.markup import escape
        from rich.tree import Tree

        top = Tree(f"[bold]{escape(common.shown_id(session_id))}[/bold]")

        def add(parent: Any, node: BranchNode) -> None:
            label = escape(_node_label(node))
            branch = parent.add(f"[bold green]{label}[/]" if node.is_current else label)
            for child in node.children:
                add(branch, child)

        for root in roots:
            add(top, root)
        _console().print(top)
        return
    common.line(common.shown_id(session_id))

    def plain(node: BranchNode, depth: int) -> None:
        common.line(f"{'  ' * depth}- {_node_label(node)}")
        for child in node.children:
            plain(child, depth + 1)

    for root in roots:
        plain(root, 1)


# -- search --------------------------------------------------------------------------------


def search_cmd(
    term: Annotated[
        str, typer.Argument(help="Text to find, literally (case ignored). Example: weather")
    ],
    user: Annotated[
        str | None,
        typer.Option("--user", "-u", help="Only this user's sessions. Example: --user alice"),
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit",
            "-n",
            min=1,
            max=1000,
            help="Most hits on a page (1-1000). Example: --limit 50",
        ),
    ] = 20,
    cursor: Annotated[
        str | None,
        typer.Option(
            "--cursor",
            help="Go on from the next_cursor a previous page printed. Example: --cursor eyJi...",
        ),
    ] = None,
    url: common.UrlOption = None,
    as_json: common.JsonOption = False,
) -> None:
    """Search every conversation for a text: newest matches first, a page at a time.

    Example: turnstore search "weather" --url sqlite+aiosqlite:///turnstore-demo.db
    """
    target = _checked_url(url)

    async def work() -> SearchPage:
        async with _store(target) as store:
            return await store.search(term, user_id=user, limit=limit, cursor=cursor)

    page = _run(target, work)
    data = {"hits": [hit.to_dict() for hit in page.hits], "next_cursor": page.next_cursor}

    def text() -> None:
        for hit in page.hits:
            branches = ",".join(common.shown_id(branch) for branch in hit.branches)
            where = f"{common.shown_id(hit.session_id)} {branches or '?'}:{hit.turn}"
            common.line(f"{hit.created_at or ''}  {where}  {hit.kind or ''}: {hit.snippet}")
        if not page.hits:
            common.line("no matches on this page" if cursor else "no matches")
        if page.next_cursor is not None:
            common.line(f"more: turnstore search {json.dumps(term)} --cursor {page.next_cursor}")

    common.emit(data, text, as_json=as_json)


# -- usage ---------------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+)\s*([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_moment(value: str | None, option: str) -> datetime | timedelta | None:
    """``7d``, ``12h``, ``30m``, ``2w`` (that long ago) or an ISO date or date-time.

    Raises:
        InvalidArgumentError: Anything else.
    """
    if value is None:
        return None
    relative = _RELATIVE.fullmatch(value.strip())
    if relative is not None:
        return timedelta(**{_UNITS[relative.group(2)]: int(relative.group(1))})
    try:
        return datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidArgumentError(
            f"{option} takes 7d, 12h, 30m, 2w or an ISO date such as 2026-01-31; got {value!r}"
        ) from None


def usage_cmd(
    by: Annotated[
        str,
        typer.Option(
            "--by",
            help=(
                "Group by any of day, week, month, model, user, session, branch (comma-"
                "separated; at most one period; empty for totals only). Example: --by day,model"
            ),
        ),
    ] = "day,model",
    since: Annotated[
        str | None,
        typer.Option(
            "--since", help="Only turns since then: 7d, 12h, 2w or a date. Example: --since 7d"
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(
            "--until", help="Only turns before then (same forms). Example: --until 2026-02-01"
        ),
    ] = None,
    user: Annotated[
        str | None,
        typer.Option("--user", "-u", help="Only this user's sessions. Example: --user alice"),
    ] = None,
    session_id: Annotated[
        str | None,
        typer.Option("--session", "-s", help="Only this session. Example: --session demo"),
    ] = None,
    tz: Annotated[
        str | None,
        typer.Option(
            "--tz",
            help="Time zone of days, weeks and months (default UTC). Example: --tz Europe/Paris",
        ),
    ] = None,
    update_prices: Annotated[
        bool,
        typer.Option(
            "--update-prices",
            help=(
                "Fetch current prices from genai-prices first (a network call). "
                "Example: --update-prices"
            ),
        ),
    ] = False,
    url: common.UrlOption = None,
    as_json: common.JsonOption = False,
) -> None:
    """Tokens and cost summed by day, model, user, session or branch, with a totals line.

    On a terminal: a table with a bar per row. Costs need the cost extra
    (pip install 'turnstore[cost]'); without it, and for models without a known price, the
    cost column says why instead of showing 0.

    Example: turnstore usage --by day,model --since 7d --url sqlite+aiosqlite:///turnstore-demo.db
    """
    target = _checked_url(url)
    keys = check_group_by(by)
    moment_since = parse_moment(since, "--since")
    moment_until = parse_moment(until, "--until")
    updater = _price_updates(update_prices)

    async def work() -> tuple[list[UsageRow], list[UsageRow]]:
        async with _store(target) as store:
            options: dict[str, Any] = {
                "since": moment_since,
                "until": moment_until,
                "user_id": user,
                "session_id": session_id,
                "tz": tz,
            }
            rows = await store.usage(group_by=keys, **options)
            totals = await store.usage(group_by=(), **options)
            return rows, totals

    try:
        rows, totals = _run(target, work)
    finally:
        if updater is not None:
            updater.stop()
    empty = UsageRow(None, None, None, None, None, 0, 0, 0, 0, 0, 0, 0, Decimal(0), None)
    total = totals[0] if totals else empty
    data = {
        "group_by": list(keys),
        "since": _stamp(moment_since),
        "until": _stamp(moment_until),
        "tz": tz or "UTC",
        "rows": [row.to_dict() for row in rows],
        "totals": total.to_dict(),
    }
    common.emit(data, lambda: _print_usage(keys, rows, total), as_json=as_json)


def _stamp(value: datetime | timedelta | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return (datetime.now(UTC) - value).isoformat(timespec="seconds")
    return value.isoformat()


_BAR = 12  # characters of the longest bar
# Column headings on a terminal, where width is short.
_SHORT = {"requests": "req", "input": "in", "output": "out", "reasoning": "reason"}
_COUNTS = (
    ("turns", "turns"),
    ("requests", "requests"),
    ("input_tokens", "input"),
    ("cached_tokens", "cached"),
    ("output_tokens", "output"),
    ("reasoning_tokens", "reasoning"),
    ("total_tokens", "total"),
)


def _key_text(row: UsageRow, key: str) -> str:
    if key in ("day", "week", "month"):
        return "" if row.period is None else row.period.isoformat()[: 7 if key == "month" else 10]
    value = getattr(row, key)
    if value is None:
        return {"model": "(unknown)", "user": "(no user)"}.get(key, "")
    return common.shown_id(str(value)) if key in ("user", "session", "branch") else str(value)


def _cost_text(row: UsageRow) -> str:
    if row.cost is not None:
        return _usd(row.cost)
    return f"— ({row.cost_reason})" if row.cost_reason else "—"


def _print_usage(keys: tuple[str, ...], rows: list[UsageRow], total: UsageRow) -> None:
    headers = [*keys, *(label for _, label in _COUNTS), "cost"]

    def cells(row: UsageRow, first: list[str]) -> list[str]:
        return [*first, *(f"{getattr(row, name):,}" for name, _ in _COUNTS), _cost_text(row)]

    # Without grouping, the one row is the totals line.
    body = [cells(row, [_key_text(row, key) for key in keys]) for row in rows] if keys else []
    totals = cells(total, ["total", *([""] * (len(keys) - 1))] if keys else [])
    if common.is_terminal(sys.stdout):
        _draw_usage(keys, rows, headers, body, totals)
        return
    table_rows = [headers, *body, totals]
    widths = [max(len(r[i]) for r in table_rows) for i in range(len(headers))]
    for values in table_rows:
        common.line(
            "  ".join(
                value.ljust(width)
                if index < len(keys) or index == len(headers) - 1
                else value.rjust(width)
                for index, (value, width) in enumerate(zip(values, widths, strict=True))
            ).rstrip()
        )


def _draw_usage(
    keys: tuple[str, ...],
    rows: list[UsageRow],
    headers: list[str],
    body: list[list[str]],
    totals: list[str],
) -> None:
    """The usage table on a terminal, with a bar per row scaled to its total tokens.

    Nothing is cut: on a narrow terminal the bars go first, then the detail columns (reasoning,
    cached, requests); ``--json`` or a pipe always has every column.
    """
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    shown = list(range(len(headers)))
    labels = [_SHORT.get(name, name) for name in headers]
    widths = [
        max(len(labels[i]), *(len(values[i]) for values in [*body, totals]))
        for i in range(len(headers))
    ]
    bars = True

    def needed() -> int:
        return sum(widths[i] + 2 for i in shown) + (_BAR + 2 if bars else 0)

    if needed() > console.width:
        bars = False
    for name in ("reasoning", "cached", "requests"):
        if needed() <= console.width:
            break
        shown.remove(headers.index(name))
    table = Table(
        show_footer=True,
        header_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for i in shown:
        numeric = i >= len(keys) and headers[i] != "cost"
        table.add_column(
            labels[i],
            footer=escape(common.printable(totals[i])),
            justify="right" if numeric else "left",
            no_wrap=True,
            min_width=widths[i],
        )
    if bars:
        table.add_column("", footer="", no_wrap=True)
    peak = max((row.total_tokens for row in rows), default=0) or 1
    for row, values in zip(rows if keys else [], body, strict=True):
        # Ids and model names are stored text: rich must not read markup in them.
        cells = [escape(common.printable(values[i])) for i in shown]
        if bars:
            length = max(1, round(_BAR * row.total_tokens / peak)) if row.total_tokens else 0
            cells.append(f"[cyan]{'█' * length}[/cyan]")
        table.add_row(*cells)
    console.print(table)
