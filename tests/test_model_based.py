"""Model-based test: random operation sequences agree with an in-memory reference model.

Hypothesis drives a session through random sequences of writes (batches with and without user
messages, pops, clears by this and by another instance, branch creation by turn and by content,
switches, deletions, usage, compaction through the SDK's compaction wrapper) on every backend,
and after every step compares every read method, and the current branch the session reports,
with :class:`tests.reference_model.SessionModel`. An operation the model says must fail has to raise
exactly the model's error type, and the full comparison that follows proves it changed nothing.

Hypothesis state machines are synchronous; each test run drives the async session API on one
event loop of its own (``asyncio.Runner``), and every example works on a fresh session id.
"""

from __future__ import annotations

import asyncio
import copy
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from agents.extensions.memory import AdvancedSQLiteSession as SDKSession
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.ext.asyncio import AsyncEngine

import turnstore
from tests.conftest import Backend
from tests.fake_compaction import compacting
from tests.helpers import assistant, function_call, function_output, run_result
from tests.reference_model import MAIN, SessionModel, UsageRow, auto_name_pattern, texts_of
from turnstore import AdvancedSession, AdvancedSQLiteSession, TurnstoreError

T = TypeVar("T")

# Words chosen to exercise search: LIKE wildcards, escapes, quotes, case, non-ASCII, emoji.
WORDS = [
    "Paris",
    "weather",
    "50%",
    "500",
    "snake_case",
    "snakeXcase",
    'say "hi"',
    "back\\slash",
    "Été",
    "été",
    "🙂",
    "東京",
    "line\nbreak",
]
SEARCH_TERMS = [
    "paris",
    "PARIS",
    "weather",
    "50%",
    "%",
    "_",
    "e_c",
    "500",
    '"hi"',
    "\\",
    "été",
    "ÉTÉ",
    "🙂",
    "東京",
    "\n",
    "zzz",
]
# Names a caller might pick; several collide with each other's case or with SQL syntax.
BRANCH_NAMES = ["alt", "Alt", "MAIN", "x'; DROP TABLE agent_messages; --", "ветка", "b_%", "b2"]
TOOLS = ["get_weather", "lookup"]
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")

texts = st.one_of(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join),
    # Longer than the 100-character preview of get_conversation_turns.
    st.lists(st.sampled_from(WORDS), min_size=20, max_size=30).map(" ".join),
)
user_items = st.one_of(
    texts.map(lambda text: {"role": "user", "content": text}),
    st.lists(texts, min_size=1, max_size=2).map(
        lambda parts: {
            "role": "user",
            "content": [{"type": "input_text", "text": part} for part in parts],
        }
    ),
)


@st.composite
def tool_round_trips(draw: st.DrawFn) -> list[dict[str, Any]]:
    call_id = f"call_{draw(st.integers(0, 9))}"
    call = function_call(draw(st.sampled_from(TOOLS)), call_id, id=f"fc_{call_id}")
    return [call, function_output(call_id, draw(texts))]


other_items = st.one_of(
    texts.map(assistant),
    st.just({"type": "web_search_call", "id": "ws_1", "status": "completed"}),
    st.just({"type": "reasoning", "id": "rs_1", "summary": []}),
)
non_user_batches = st.lists(
    st.one_of(tool_round_trips(), other_items.map(lambda item: [item])), max_size=3
).map(lambda groups: [item for group in groups for item in group])


@st.composite
def user_batches(draw: st.DrawFn) -> list[dict[str, Any]]:
    """What a run adds: a user message, maybe tools and replies; rarely a second user message."""
    batch = [draw(user_items), *draw(non_user_batches)]
    if draw(st.integers(0, 4)) == 0:
        batch += [draw(user_items), *draw(non_user_batches)]
    return batch


usage_rows = st.builds(
    lambda requests, input_tokens, output_tokens, cached, reasoning: run_result(
        requests, input_tokens, output_tokens, cached, reasoning
    ),
    st.integers(0, 3),
    st.integers(0, 5000),
    st.integers(0, 5000),
    st.integers(0, 5),
    st.integers(0, 5),
)


def usage_row(result: Any) -> UsageRow:
    """What the SDK stores for a run: its counts, and token details as JSON of their fields."""
    usage = result.context_wrapper.usage
    return UsageRow(
        requests=usage.requests,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
        input_tokens_details=dict(vars(usage.input_tokens_details)),
        output_tokens_details=dict(vars(usage.output_tokens_details)),
    )


def untimed(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Records without their timestamp, after checking it has the SDK's text form."""
    for record in records:
        assert isinstance(record[key], str), record
        assert TIMESTAMP.fullmatch(record[key]), record
    return [{k: v for k, v in record.items() if k != key} for record in records]


@dataclass(frozen=True)
class Probe:
    """What the reads of one step ask for: a limit, a search term, one turn's usage."""

    limit: int
    term: str
    turn: int


class SessionMachine(RuleBasedStateMachine):
    """One session under random operations, checked against the reference model.

    With ``sdk=True`` the session is the SDK's own class, which checks the model itself: the
    SDK raises plain ``ValueError`` where turnstore raises its subclasses, does not check
    argument types, and leaves the order of tools within a turn open. ``other`` is a second
    instance of the same session, as another process would hold it.

    Compaction is where the two differ by design: the SDK's class has no atomic replacement,
    so its compaction wrapper clears the whole session and adds the summary to ``main``;
    turnstore replaces the current branch only and keeps every other branch and all usage.
    """

    def __init__(
        self, runner: asyncio.Runner, session: Any, other: Any, *, sdk: bool = False
    ) -> None:
        super().__init__()
        self.runner = runner
        self.session = session
        self.other = other
        self.sdk = sdk
        self.model = SessionModel()
        self.steps = 0

    def teardown(self) -> None:
        if self.sdk:
            self.session.close()
            self.other.close()
        else:
            self.runner.run(self.session.aclose())
            self.runner.run(self.other.aclose())

    def reported_branch(self) -> str:
        """The current branch as the session reports it, by every name it has for it."""
        names: set[str] = {
            getattr(self.session, name)
            for name in ("current_branch_id", "_current_branch_id")
            if hasattr(self.session, name)
        }
        assert len(names) == 1, names
        return names.pop()

    def assert_reported_branch(self) -> None:
        assert self.reported_branch() == self.model.current

    def run(self, operation: Awaitable[T]) -> T:
        return self.runner.run(_awaited(operation))

    def refused_as_modelled(
        self, operation: Callable[[], Awaitable[object]], model_check: Callable[[], object]
    ) -> bool:
        """Whether the model refuses an operation; if it does, the session must refuse it too.

        ``model_check`` raises what the session must raise, or returns without changing the
        model.
        """
        try:
            model_check()
        except TurnstoreError as expected:
            self.assert_refused(operation, expected)
            return True
        return False

    def assert_refused(
        self, operation: Callable[[], Awaitable[object]], expected: TurnstoreError
    ) -> None:
        with pytest.raises(ValueError if self.sdk else TurnstoreError) as raised:
            self.run(operation())
        wanted = ValueError if self.sdk else type(expected)
        assert type(raised.value) is wanted, (raised.value, expected)

    def apply(
        self,
        operation: Callable[[], Awaitable[object]],
        model_operation: Callable[[SessionModel], object],
    ) -> None:
        """Run an operation on the session and on a copy of the model that then replaces it."""
        trial = copy.deepcopy(self.model)
        try:
            model_operation(trial)
        except TurnstoreError as error:
            self.assert_refused(operation, error)
            return
        self.run(operation())
        self.model = trial

    # -- writes --------------------------------------------------------------------------

    @initialize(first=user_batches(), second=user_batches(), fork=st.booleans())
    def start_conversation(
        self, first: list[dict[str, Any]], second: list[dict[str, Any]], fork: bool
    ) -> None:
        """Two turns, and often a branch from the second: examples start with some history."""
        self.add_turn(first)
        self.add_turn(second)
        if fork:
            turn = self.model.user_turns()[-1].turn
            self.create_branch(lambda: self.session.create_branch_from_turn(turn), turn, None)

    # Hypothesis favours rules that sort first (fewest arguments, then by name): adding a
    # turn should be the commonest step, so it is named to sort first and every rule takes
    # an argument.
    @rule(batch=user_batches())
    def add_turn(self, batch: list[dict[str, Any]]) -> None:
        self.run(self.session.add_items(batch))
        self.model.add_items(batch)

    @rule(batch=non_user_batches)
    def add_without_user_message(self, batch: list[dict[str, Any]]) -> None:
        self.run(self.session.add_items(batch))
        self.model.add_items(batch)

    @rule(count=st.integers(1, 3))
    def pop_items(self, count: int) -> None:
        for _ in range(count):
            assert self.run(self.session.pop_item()) == self.model.pop_item()

    # Clearing an almost empty session teaches little and keeps examples shallow.
    @precondition(lambda self: sum(map(len, self.model.branches.values())) >= 6)
    @rule(restart=st.none() | user_batches())
    def clear_session(self, restart: list[dict[str, Any]] | None) -> None:
        self.run(self.session.clear_session())
        self.model.clear_session()
        if restart is not None:
            self.add_turn(restart)

    @precondition(lambda self: sum(map(len, self.model.branches.values())) >= 6)
    @rule(restart=st.none() | user_batches())
    def clear_by_another_instance(self, restart: list[dict[str, Any]] | None) -> None:
        reported = self.reported_branch()
        self.run(self.other.clear_session())
        # Nothing tells this instance until its next read or write finds the clear.
        assert self.reported_branch() == reported
        self.model.clear_session()
        if restart is not None:
            self.add_turn(restart)
            self.assert_reported_branch()

    @precondition(lambda self: bool(self.model.entries()))
    @rule(force=st.just(True))
    def compact(self, force: bool) -> None:
        """A manual compaction through the SDK's wrapper (a fresh one, so nothing is cached)."""
        wrapper, responses = compacting(self.session)
        self.run(wrapper.run_compaction({"force": force}))
        [output] = responses.outputs
        if self.sdk:
            self.model.clear_session()
            self.model.add_items(output)
        else:
            self.model.replace_branch(output)
        self.assert_reported_branch()

    @rule(result=usage_rows)
    def store_run_usage(self, result: Any) -> None:
        self.run(self.session.store_run_usage(result))
        self.model.store_run_usage(usage_row(result))

    # -- branches ------------------------------------------------------------------------

    # Each draw below picks a kind of argument first, from a list weighted towards arguments
    # that succeed (so examples reach deep states), with the misuses the API must refuse.

    def draw_new_name(self, data: st.DataObject) -> str | None:
        """None (generate one), a caller's name, a used name or a blank one."""
        kind = data.draw(st.sampled_from(["auto", "auto", "chosen", "chosen", "used", "blank"]))
        if kind == "auto":
            return None
        if kind == "chosen":
            return data.draw(st.sampled_from(BRANCH_NAMES), label="branch_name")
        if kind == "used":
            return data.draw(st.sampled_from(sorted(self.model.reserved)), label="used name")
        return data.draw(st.sampled_from(["", "   "]), label="blank name")

    def draw_branch_id(self, data: st.DataObject) -> str:
        """An existing branch, the current one, main, or a gone, unknown or blank one."""
        existing = self.model.existing()
        kinds = ["existing", "existing", "existing"] if existing else []
        kind = data.draw(st.sampled_from([*kinds, "current", "main", "used", "unknown"]))
        if kind == "existing":
            return data.draw(st.sampled_from(existing), label="branch_id")
        if kind == "current":
            return self.model.current
        if kind == "main":
            return MAIN
        if kind == "used":
            return data.draw(st.sampled_from(sorted(self.model.reserved)), label="used branch_id")
        return data.draw(st.sampled_from(["nope", "MAIN", "", " "]), label="unknown branch_id")

    def draw_turn(self, data: st.DataObject) -> Any:
        """A user turn of the current branch, any small int, or not an int at all."""
        turns = [entry.turn for entry in self.model.user_turns()]
        kinds = ["user turn", "user turn", "user turn"] if turns else []
        kinds += ["any"] if self.sdk else ["any", "not an int"]
        kind = data.draw(st.sampled_from(kinds))
        if kind == "user turn":
            return data.draw(st.sampled_from(turns), label="turn")
        if kind == "any":
            return data.draw(st.integers(-1, 6), label="any turn")
        return data.draw(st.sampled_from([True, 1.0, "1"]), label="not an int")

    def draw_search_term(self, data: st.DataObject) -> str:
        """A word of a user message on the current branch (in another case), or any term."""
        words = sorted(
            {
                word
                for entry in self.model.user_turns()
                for text in texts_of(entry.item["content"])
                for word in text.split()
            }
        )
        kind = data.draw(st.sampled_from(["word", "word", "any"] if words else ["any"]))
        if kind == "word":
            word = data.draw(st.sampled_from(words), label="word")
            return word.upper() if data.draw(st.booleans(), label="upper") else word
        return data.draw(st.sampled_from(SEARCH_TERMS), label="term")

    def create_branch(
        self, operation: Callable[[], Awaitable[str]], turn: int, name: str | None
    ) -> None:
        created = self.run(operation())
        if name is None:
            assert auto_name_pattern(turn).fullmatch(created), created
        else:
            assert created == name
        self.model.branch_from_turn(turn, created)
        self.assert_reported_branch()

    @rule(data=st.data())
    def create_branch_from_turn(self, data: st.DataObject) -> None:
        turn = self.draw_turn(data)
        name = self.draw_new_name(data)

        def operation() -> Any:
            return self.session.create_branch_from_turn(turn, name)

        if not self.refused_as_modelled(
            operation, lambda: self.model.check_branch_from_turn(turn, name)
        ):
            self.create_branch(operation, turn, name)

    @rule(data=st.data())
    def create_branch_from_content(self, data: st.DataObject) -> None:
        term = self.draw_search_term(data)
        name = self.draw_new_name(data)

        def operation() -> Any:
            return self.session.create_branch_from_content(term, name)

        def check() -> None:
            self.model.check_branch_from_turn(self.model.turn_for_content(term), name)

        if not self.refused_as_modelled(operation, check):
            self.create_branch(operation, self.model.turn_for_content(term), name)

    @rule(data=st.data())
    def switch_to_branch(self, data: st.DataObject) -> None:
        name = self.draw_branch_id(data)
        self.apply(
            lambda: self.session.switch_to_branch(name),
            lambda model: model.switch_to_branch(name),
        )
        self.assert_reported_branch()

    @rule(data=st.data(), force=st.booleans())
    def delete_branch(self, data: st.DataObject, force: bool) -> None:
        name = self.draw_branch_id(data)
        self.apply(
            lambda: self.session.delete_branch(name, force),
            lambda model: model.delete_branch(name, force),
        )
        self.assert_reported_branch()

    # -- every read agrees with the model after every step --------------------------------

    @invariant()
    def reads_agree(self) -> None:
        self.steps += 1
        model, step = self.model, self.steps
        # Every branch's items after every step (a write on one branch must not touch
        # another's); every other read on the current branch (branch_id=None) after every
        # step, and every other step on one named branch, taking each in turn ("nope" never
        # exists). Reads are what makes a step slow, so they are spent where writes land.
        names = sorted({*model.branches, model.current, "nope"})
        probed: list[str | None] = [None]
        if step % 2:
            probed.append(names[step // 2 % len(names)])
        probes = {
            branch: Probe(
                limit=LIMITS[step % len(LIMITS)],
                term=SEARCH_TERMS[step % len(SEARCH_TERMS)],
                turn=step % ((model.max_turn(branch) or 0) + 2),
            )
            for branch in probed
        }
        actual = self.run(read_all(self.session, names, probes))
        # Reads find a clear made by another instance: from here on ``main``.
        self.assert_reported_branch()

        listed = untimed(actual["list_branches"], "created_at")
        branches = [
            (b["branch_id"], b["message_count"], b["user_turns"], b["is_current"]) for b in listed
        ]
        assert sorted(branches) == model.list_branches()
        assert actual["session_usage"] == model.session_usage()
        assert actual["current_items"] == model.items()
        for name in names:
            assert actual["items"][name] == model.items(name), name
        for branch, probe in probes.items():
            answers = actual["reads"][branch]
            assert answers["limited"] == model.items(branch, probe.limit), (branch, probe)
            turns = untimed(answers["turns"], "timestamp")
            assert turns == model.conversation_turns(branch), branch
            found = untimed(answers["found"], "timestamp")
            assert found == model.find_turns(probe.term, branch), (branch, probe)
            assert list(answers["by_turns"].items()) == model.conversation_by_turns(branch)
            tools = (
                sorted(answers["tools"], key=lambda t: (t[2], t[0]))
                if self.sdk
                else answers["tools"]
            )
            assert tools == model.tool_usage(branch), branch
            assert answers["turn_usage"] == model.turn_usage(branch), branch
            one_turn = model.one_turn_usage(probe.turn, branch)
            assert answers["one_turn_usage"] == one_turn, (branch, probe)
            if branch is not None:
                assert answers["branch_usage"] == model.session_usage(branch), branch


LIMITS = [1, 2, 3, 0, -1, 100]


async def _awaited(operation: Awaitable[T]) -> T:
    return await operation


async def read_all(
    session: Any, names: list[str], probes: dict[str | None, Probe]
) -> dict[str, Any]:
    """Items of the named branches, and every read for each probed branch."""
    reads: dict[str | None, dict[str, Any]] = {}
    for branch, probe in probes.items():
        reads[branch] = {
            "limited": await session.get_items(probe.limit, branch_id=branch),
            "turns": await session.get_conversation_turns(branch),
            "found": await session.find_turns_by_content(probe.term, branch),
            "by_turns": await session.get_conversation_by_turns(branch),
            "tools": await session.get_tool_usage(branch),
            "turn_usage": await session.get_turn_usage(branch_id=branch),
            "one_turn_usage": await session.get_turn_usage(probe.turn, branch_id=branch),
            "branch_usage": None if branch is None else await session.get_session_usage(branch),
        }
    return {
        "list_branches": await session.list_branches(),
        "session_usage": await session.get_session_usage(),
        "current_items": await session.get_items(),
        "items": {name: await session.get_items(branch_id=name) for name in names},
        "reads": reads,
    }


def test_session_agrees_with_the_reference_model(backend: Backend) -> None:
    # The backend fixture's engine belongs to pytest's event loop; the state machine runs on
    # a loop of its own, so it gets its own engine on the same database.
    engine = backend.new_engine()

    def machine(runner: asyncio.Runner) -> SessionMachine:
        session_id = new_session_id()
        session = AdvancedSession(session_id=session_id, engine=engine, create_tables=True)
        other = AdvancedSession(session_id=session_id, engine=engine)
        return SessionMachine(runner, session, other)

    with asyncio.Runner() as runner:
        try:
            # Any factory of machines is documented to work; the stub asks for a class.
            run_state_machine_as_test(lambda: machine(runner))  # type: ignore[arg-type]
        finally:
            runner.run(_shut_down(engine))


def test_reference_model_agrees_with_the_sdk_class(tmp_path: Path) -> None:
    """The model is checked against the class turnstore replaces, so it cannot drift."""
    path = tmp_path / "sdk.db"

    def machine(runner: asyncio.Runner) -> SessionMachine:
        session_id = new_session_id()
        session = SDKSession(session_id=session_id, db_path=path, create_tables=True)
        other = SDKSession(session_id=session_id, db_path=path)
        return SessionMachine(runner, session, other, sdk=True)

    with asyncio.Runner() as runner:
        run_state_machine_as_test(lambda: machine(runner))  # type: ignore[arg-type]


def test_drop_in_agrees_with_the_reference_model(tmp_path: Path) -> None:
    """The drop-in class on its own SQLite file, as code switching its import would run it."""
    path = tmp_path / "drop-in.db"

    def machine(runner: asyncio.Runner) -> SessionMachine:
        session_id = new_session_id()
        session = AdvancedSQLiteSession(session_id=session_id, db_path=path, create_tables=True)
        other = AdvancedSQLiteSession(session_id=session_id, db_path=path)
        return SessionMachine(runner, session, other)

    with asyncio.Runner() as runner:
        try:
            run_state_machine_as_test(lambda: machine(runner))  # type: ignore[arg-type]
        finally:
            runner.run(turnstore.dispose_engines())


def new_session_id() -> str:
    """A session id of its own for each example, so examples cannot see each other."""
    return f"model-{uuid.uuid4().hex}"


async def _shut_down(engine: AsyncEngine) -> None:
    await turnstore.dispose_engines()
    await engine.dispose()
