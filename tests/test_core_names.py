"""Aggregation names: NameMap for tools/prompts and UriMap for resources, in every prefix mode."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from mcp_bastion.core.names import MAX_NAME, NameMap, UriMap, fit_name, valid_server_name

MODES = ["always", "on-collision", "none"]
FAST = settings(max_examples=60, deadline=None)

# --- strategies -----------------------------------------------------------------------------

ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
server_names = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(ALNUM),
    st.text(alphabet=ALNUM + ".-", max_size=63),
)
# A small pool, so that servers share names, and one server name is a prefix of another.
short_servers = st.sampled_from(["a", "b", "c", "a.b", "a-b", "ab", "b.c-1"])
# Tool names as the spec allows them (1-128 of A-Z a-z 0-9 _ - .), and arbitrary text.
spec_tool_names = st.text(alphabet=ALNUM + "_.-", min_size=1, max_size=128)
any_tool_names = st.text(min_size=1, max_size=150)
# Names without the separator, drawn from a small pool so that they collide across servers.
plain_pool = st.sampled_from(["echo", "add", "search", "read", "x", "x" * 130, "a-b", "v1.2"])


def listing(names: st.SearchStrategy[str], servers: st.SearchStrategy[str] = server_names) -> Any:
    return st.dictionaries(servers, st.lists(names, max_size=6, unique=True), max_size=5)


def build(mode: str, lists: dict[str, list[str]], sep: str = "_") -> NameMap:
    m = NameMap(mode, sep)  # type: ignore[arg-type]
    m.rebuild(lists)
    return m


def pairs(lists: dict[str, list[str]]) -> list[tuple[str, str]]:
    return [(s, n) for s, names in lists.items() for n in names]


def assert_bijective(m: NameMap, lists: dict[str, list[str]]) -> None:
    servers = list(lists)
    seen: dict[str, tuple[str, str]] = {}
    for server, name in pairs(lists):
        exposed = m.expose(server, name)
        assert m.resolve(exposed, servers) == (server, name), (server, name, exposed)
        assert seen.setdefault(exposed, (server, name)) == (server, name)
        assert m.exposed[exposed] == (server, name)
    assert len(m.exposed) == len(pairs(lists))


def shuffled(lists: dict[str, list[str]], rng: random.Random, within: bool) -> dict[str, list[str]]:
    keys = list(lists)
    rng.shuffle(keys)
    out = {}
    for k in keys:
        names = list(lists[k])
        if within:
            rng.shuffle(names)
        out[k] = names
    return out


# --- valid_server_name / fit_name -------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "A", "0", "github", "my-server", "v1.2", "a" * 64, "x-" * 20 + "y"])
def test_valid_server_names(name: str) -> None:
    assert valid_server_name(name)


@pytest.mark.parametrize(
    "name", ["", "-a", ".a", "a_b", "a b", "a+b", "a/b", "a:b", "ä", "a" * 65, "a\n", "\na", "a\x00"]
)
def test_invalid_server_names(name: str) -> None:
    assert not valid_server_name(name)


@given(server_names)
@FAST
def test_generated_server_names_are_valid(name: str) -> None:
    assert valid_server_name(name)
    assert "_" not in name and "+" not in name and 1 <= len(name) <= 64


@given(st.text(max_size=70))
@example("a\n")  # "$" in the pattern also matches before a trailing newline
@FAST
def test_valid_server_name_agrees_with_its_definition(name: str) -> None:
    expected = (
        1 <= len(name) <= 64
        and name[0].isascii()
        and name[0].isalnum()
        and all(c.isascii() and (c.isalnum() or c in ".-") for c in name)
    )
    assert valid_server_name(name) == expected


def test_fit_name() -> None:
    assert fit_name("x" * MAX_NAME) == "x" * MAX_NAME
    long = "y" * 200
    fitted = fit_name(long)
    assert len(fitted) == MAX_NAME
    assert fitted.startswith("y" * 117 + "-")
    assert fit_name(long) == fitted  # stable
    assert fit_name(long + "z") != fitted


@given(st.text(min_size=0, max_size=400))
@FAST
def test_fit_name_properties(name: str) -> None:
    fitted = fit_name(name)
    assert len(fitted) <= MAX_NAME
    if len(name) <= MAX_NAME:
        assert fitted == name
    else:
        assert fitted[: MAX_NAME - 11] == name[: MAX_NAME - 11]


@given(st.text(min_size=118, max_size=200), st.text(min_size=1, max_size=20))
@FAST
def test_fit_name_keeps_long_names_with_a_common_prefix_apart(name: str, suffix: str) -> None:
    assert fit_name(name) != fit_name(name + suffix)


# --- NameMap: examples ----------------------------------------------------------------------


def test_always_prefixes_everything() -> None:
    m = build("always", {"b": ["echo"], "a": ["echo", "add"]})
    assert m.expose("a", "echo") == "a_echo"
    assert m.expose("b", "echo") == "b_echo"
    assert m.expose("a", "add") == "a_add"
    assert m.resolve("a_add", ["a", "b"]) == ("a", "add")
    assert m.resolve("add", ["a", "b"]) is None


def test_on_collision_prefixes_only_shared_names() -> None:
    m = build("on-collision", {"b": ["echo", "only-b"], "a": ["echo", "only-a"]})
    assert m.expose("a", "echo") == "a_echo"
    assert m.expose("b", "echo") == "b_echo"
    assert m.expose("a", "only-a") == "only-a"
    assert m.resolve("only-b", ["a", "b"]) == ("b", "only-b")
    assert m.resolve("echo", ["a", "b"]) is None


def test_none_mode_keeps_names_and_prefixes_only_to_avoid_a_clash() -> None:
    m = build("none", {"a": ["echo", "add"], "b": ["echo"]})
    assert m.expose("a", "add") == "add"
    assert m.expose("a", "echo") == "echo"  # first server (sorted) keeps the plain name
    assert m.expose("b", "echo") == "b_echo"
    assert m.resolve("b_echo", ["a", "b"]) == ("b", "echo")


@pytest.mark.parametrize("sep", ["_", "__", ".", "::", "~"])
def test_separators(sep: str) -> None:
    m = build("always", {"a": ["t"], "b": ["t"]}, sep)
    assert m.expose("a", "t") == f"a{sep}t"
    assert m.resolve(f"b{sep}t", ["a", "b"]) == ("b", "t")


def test_long_names_are_fitted_and_still_map_back() -> None:
    long = "t" * 126
    m = build("always", {"server": [long, long + "-other"]})
    a, b = m.expose("server", long), m.expose("server", long + "-other")
    assert len(a) == len(b) == MAX_NAME and a != b
    assert m.resolve(a, ["server"]) == ("server", long)
    assert m.resolve(b, ["server"]) == ("server", long + "-other")


def test_unlisted_names_resolve_by_prefix_longest_server_first() -> None:
    m = build("always", {}, "-")
    assert m.resolve("a-b-c", ["a", "a-b"]) == ("a-b", "c")
    assert m.resolve("a-c", ["a", "a-b"]) == ("a", "c")
    assert m.resolve("a-", ["a"]) is None  # the prefix alone names nothing
    assert m.resolve("zzz", ["a"]) is None
    assert m.expose("a", "new") == "a-new"


def test_unlisted_names_in_plain_modes() -> None:
    oc = build("on-collision", {"a": ["x"]})
    assert oc.expose("a", "new") == "new"
    assert oc.resolve("a_new", ["a"]) == ("a", "new")  # prefixed form still understood
    assert oc.resolve("new", ["a"]) is None
    none = build("none", {"a": ["x"]})
    assert none.expose("a", "new") == "new"
    assert none.resolve("a_new", ["a"]) is None  # "none" never parses prefixes


def test_rebuild_replaces_the_previous_mapping() -> None:
    m = build("on-collision", {"a": ["x"], "b": ["x"]})
    assert m.expose("a", "x") == "a_x"
    m.rebuild({"a": ["x"]})
    assert m.expose("a", "x") == "x"
    assert m.resolve("b_x", ["a"]) is None
    assert set(m.by_server) == {"a"}


def test_duplicate_names_within_one_server_are_harmless() -> None:
    for mode in MODES:
        m = build(mode, {"a": ["x", "x"], "b": ["y"]})
        assert m.resolve(m.expose("a", "x"), ["a", "b"]) == ("a", "x")


def test_plain_name_that_looks_prefixed_is_kept_apart() -> None:
    # Server "b" has a tool literally named "a_x"; "a" and "c" share "x" -> "a_x" is taken.
    m = build("on-collision", {"a": ["x"], "b": ["a_x"], "c": ["x"]})
    assert_bijective(m, {"a": ["x"], "b": ["a_x"], "c": ["x"]})
    assert m.expose("b", "a_x") == "b_a_x"


def test_on_collision_prefixed_name_taken_by_a_plain_name_is_not_lost() -> None:
    # "a" has a unique tool literally named "b_x"; "b" and "c" share "x", so b's "x"
    # wants "b_x" too. b's tool must stay reachable and never resolve to a's tool.
    lists = {"a": ["b_x"], "b": ["x"], "c": ["x"]}
    m = build("on-collision", lists)
    assert m.resolve(m.expose("b", "x"), list(lists)) == ("b", "x")
    assert_bijective(m, lists)


def test_a_server_own_plain_name_does_not_shadow_its_prefixed_one() -> None:
    # Same clash inside one server: its plain "a_x" takes the name its shared "x" needs.
    lists = {"a": ["a_x", "x"], "b": ["x"]}
    m = build("on-collision", lists)
    assert m.resolve(m.expose("a", "x"), list(lists)) == ("a", "x")
    assert_bijective(m, lists)


def test_none_mode_clash_fallback_is_not_lost() -> None:
    lists = {"a": ["b_x", "x"], "b": ["x"]}
    m = build("none", lists)
    assert m.resolve(m.expose("b", "x"), list(lists)) == ("b", "x")
    assert_bijective(m, lists)


def test_mapping_does_not_depend_on_the_order_of_names_within_a_server() -> None:
    a = build("on-collision", {"a": ["x", "a_x"], "b": ["x"]})
    b = build("on-collision", {"a": ["a_x", "x"], "b": ["x"]})
    assert a.exposed == b.exposed


# --- NameMap: properties ------------------------------------------------------------------


@given(listing(any_tool_names))
@settings(max_examples=80, deadline=None)
def test_always_round_trips_arbitrary_names(lists: dict[str, list[str]]) -> None:
    m = build("always", lists)
    assert_bijective(m, lists)
    for server, name in pairs(lists):
        exposed = m.expose(server, name)
        assert exposed == fit_name(f"{server}_{name}")
        assert len(exposed) <= MAX_NAME


@given(listing(spec_tool_names))
@settings(max_examples=80, deadline=None)
def test_always_round_trips_spec_names(lists: dict[str, list[str]]) -> None:
    m = build("always", lists)
    assert_bijective(m, lists)
    assert all(len(x) <= MAX_NAME for x in m.exposed)


@pytest.mark.parametrize("mode", MODES)
@given(lists=listing(plain_pool, short_servers))
@settings(max_examples=80, deadline=None)
def test_round_trip_with_colliding_names(mode: str, lists: dict[str, list[str]]) -> None:
    m = build(mode, lists)
    assert_bijective(m, lists)
    counts: dict[str, int] = {}
    for _, n in pairs(lists):
        counts[n] = counts.get(n, 0) + 1
    for server, name in pairs(lists):
        exposed = m.expose(server, name)
        assert len(exposed) <= MAX_NAME or (mode != "always" and exposed == name)
        if mode == "always" or (mode == "on-collision" and counts[name] > 1):
            assert exposed == fit_name(f"{server}_{name}")
        elif mode == "on-collision":
            assert exposed == name


@pytest.mark.parametrize("mode", ["always", "on-collision"])
@given(lists=listing(st.text(alphabet=ALNUM + ".-", min_size=1, max_size=128)))
@settings(max_examples=60, deadline=None)
def test_prefixed_names_fit_in_128(mode: str, lists: dict[str, list[str]]) -> None:
    m = build(mode, lists)
    assert_bijective(m, lists)
    assert all(len(x) <= MAX_NAME for x in m.exposed)


@pytest.mark.parametrize("mode", MODES)
@given(lists=listing(plain_pool, short_servers), seed=st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_deterministic_regardless_of_input_order(mode: str, lists: dict[str, list[str]], seed: int) -> None:
    rng = random.Random(seed)
    first = build(mode, lists)
    again = build(mode, shuffled(lists, rng, within=True))
    assert first.exposed == again.exposed
    assert first.by_server == again.by_server


@given(lists=listing(any_tool_names, short_servers), seed=st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_always_deterministic_for_arbitrary_names(lists: dict[str, list[str]], seed: int) -> None:
    first = build("always", lists)
    again = build("always", shuffled(lists, random.Random(seed), within=True))
    assert first.exposed == again.exposed


@given(server=server_names, name=any_tool_names, others=st.lists(server_names, max_size=4))
@FAST
def test_always_resolves_unlisted_names_by_prefix(server: str, name: str, others: list[str]) -> None:
    # Names not listed yet (before a refresh) still resolve when they fit unshortened.
    assume(len(f"{server}_{name}") <= MAX_NAME)
    m = build("always", {})
    assert m.resolve(m.expose(server, name), [*others, server]) == (server, name)


# --- UriMap ---------------------------------------------------------------------------------


def umap(mode: str, uris: dict[str, list[str]], templates: dict[str, list[str]] | None = None) -> UriMap:
    m = UriMap(mode)  # type: ignore[arg-type]
    m.rebuild(uris, templates or {})
    return m


def test_uri_always() -> None:
    m = umap("always", {"a": ["file:///x"], "b": ["file:///x"]})
    assert m.expose("a", "file:///x") == "a+file:///x"
    assert m.resolve("b+file:///x", ["a", "b"]) == ("b", "file:///x")
    assert m.resolve("file:///x", ["a", "b"]) is None
    assert m.resolve("file:///x", ["a"]) is None  # even a single server needs its prefix
    assert m.resolve("c+file:///x", ["a", "b"]) is None
    assert m.resolve("a+", ["a"]) is None
    assert m.expose("a", "unlisted://y") == "a+unlisted://y"
    assert m.resolve("a+unlisted://y", ["a"]) == ("a", "unlisted://y")


def test_uri_on_collision() -> None:
    m = umap("on-collision", {"a": ["file:///x", "mem://a"], "b": ["file:///x", "mem://b"]})
    assert m.expose("a", "file:///x") == "a+file:///x"
    assert m.expose("b", "file:///x") == "b+file:///x"
    assert m.expose("a", "mem://a") == "mem://a"
    assert m.resolve("mem://b", ["a", "b"]) == ("b", "mem://b")
    assert m.resolve("a+file:///x", ["a", "b"]) == ("a", "file:///x")
    assert m.resolve("file:///x", ["a", "b"]) is None  # ambiguous
    assert m.resolve("mem://unknown", ["a", "b"]) is None
    assert m.resolve("mem://unknown", ["a"]) == ("a", "mem://unknown")  # one server: it is that one


def test_uri_none_mode() -> None:
    m = umap("none", {"b": ["mem://shared"], "a": ["mem://shared", "mem://a"]})
    assert m.expose("a", "mem://a") == "mem://a"
    assert m.expose("b", "mem://shared") == "mem://shared"
    assert m.resolve("mem://a", ["a", "b"]) == ("a", "mem://a")
    # A shared URI cannot be told apart in "none": the last server (sorted) deterministically wins.
    assert m.resolve("mem://shared", ["a", "b"]) == ("b", "mem://shared")
    assert m.resolve("a+mem://a", ["a", "b"]) is None  # no prefixes in "none"
    swapped = umap("none", {"a": ["mem://shared", "mem://a"], "b": ["mem://shared"]})
    assert swapped.plain == m.plain


def test_uri_templates() -> None:
    m = umap(
        "on-collision",
        {"a": [], "b": []},
        {
            "a": ["notes://{id}", "file:///a.b/{path}"],
            "b": ["weather://{city}/{day}", "same://{x}"],
            "c": ["same://{x}"],
        },
    )
    servers = ["a", "b", "c"]
    assert m.resolve("notes://42", servers) == ("a", "notes://42")
    assert m.resolve("weather://paris/mon", servers) == ("b", "weather://paris/mon")
    assert m.resolve("weather://paris", servers) is None  # the second variable is missing
    assert m.resolve("notes://", servers) is None  # a variable needs at least one character
    assert m.resolve("file:///a.b/x/y", servers) == ("a", "file:///a.b/x/y")
    assert m.resolve("file:///aXb/x", servers) is None  # '.' is literal, not a regex wildcard
    # The same template on two servers is a collision: prefixed, and the plain form is ambiguous.
    assert m.expose("b", "same://{x}") == "b+same://{x}"
    assert m.resolve("same://1", servers) is None
    assert m.resolve("c+same://1", servers) == ("c", "same://1")
    assert m.expose("a", "notes://{id}") == "notes://{id}"


def test_uri_template_with_regex_metacharacters() -> None:
    m = umap("none", {}, {"a": ["q://(x)[y]*+?{v}$^|\\"]})
    assert m.resolve("q://(x)[y]*+?VALUE$^|\\", ["a", "b"]) == ("a", "q://(x)[y]*+?VALUE$^|\\")
    assert m.resolve("q://xy", ["a", "b"]) is None


def test_uri_plain_table_wins_over_templates() -> None:
    m = umap("on-collision", {"a": ["notes://index"]}, {"b": ["notes://{id}"]})
    assert m.resolve("notes://index", ["a", "b"]) == ("a", "notes://index")
    assert m.resolve("notes://7", ["a", "b"]) == ("b", "notes://7")


def test_uri_a_uri_colliding_with_a_template_is_prefixed() -> None:
    m = umap("on-collision", {"a": ["notes://{id}"]}, {"b": ["notes://{id}"]})
    assert m.expose("a", "notes://{id}") == "a+notes://{id}"
    assert m.expose("b", "notes://{id}") == "b+notes://{id}"


def test_uri_plain_uri_whose_scheme_starts_with_a_server_name() -> None:
    # On-collision keeps a unique URI unprefixed; "git+https" is a real scheme, and a
    # server called "git" must not make the gateway strip "git+" off it.
    uri = "git+https://example.com/repo.git"
    m = umap("on-collision", {"git": [uri], "other": ["mem://x"]})
    exposed = m.expose("git", uri)
    assert m.resolve(exposed, ["git", "other"]) == ("git", uri)


uri_schemes = st.sampled_from(["file", "mem", "notes", "a", "b.c", "x-y", "s3"])
uris = st.builds(lambda s, p: f"{s}://{p}", uri_schemes, st.text(max_size=8))


@pytest.mark.parametrize("mode", ["always", "on-collision"])
@given(lists=st.dictionaries(short_servers, st.lists(uris, max_size=5, unique=True), max_size=4))
@settings(max_examples=80, deadline=None)
def test_uri_round_trip(mode: str, lists: dict[str, list[str]]) -> None:
    m = umap(mode, lists)
    servers = list(lists)
    exposed: dict[str, tuple[str, str]] = {}
    for server, items in lists.items():
        for uri in items:
            e = m.expose(server, uri)
            assert m.resolve(e, servers) == (server, uri)
            assert exposed.setdefault(e, (server, uri)) == (server, uri)


@given(lists=st.dictionaries(short_servers, st.lists(uris, max_size=5, unique=True), max_size=4))
@settings(max_examples=60, deadline=None)
def test_uri_round_trip_none_mode_for_unique_uris(lists: dict[str, list[str]]) -> None:
    seen: set[str] = set()
    unique = {}
    for server, items in lists.items():
        unique[server] = [u for u in items if u not in seen]
        seen.update(items)
    m = umap("none", unique)
    for server, items in unique.items():
        for uri in items:
            assert m.expose(server, uri) == uri
            assert m.resolve(uri, list(unique)) == (server, uri)


@pytest.mark.parametrize("mode", MODES)
@given(
    lists=st.dictionaries(short_servers, st.lists(uris, max_size=5, unique=True), max_size=4),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=60, deadline=None)
def test_uri_deterministic_regardless_of_input_order(
    mode: str, lists: dict[str, list[str]], seed: int
) -> None:
    rng = random.Random(seed)
    a = umap(mode, lists)
    b = umap(mode, shuffled(lists, rng, within=True))
    assert a.plain == b.plain and a.prefixed == b.prefixed
