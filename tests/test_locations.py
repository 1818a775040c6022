"""nginx location matching and virtual server selection."""

from __future__ import annotations

import re

import pytest

from scriptlb.config.model import (
    HttpConf,
    ListenConf,
    LocationConf,
    ProxyPassConf,
    ServerConf,
    Var,
)
from scriptlb.locations import (
    LocationMatcher,
    ServerSelector,
    compile_nginx_regex,
    normalize_host,
    selectors_by_listen,
)


def loc(modifier: str, pattern: str, proxied: bool = False) -> LocationConf:
    proxy_pass = ProxyPassConf(upstream="backend", uri=None, proxy_host="backend") if proxied else None
    return LocationConf(modifier=modifier, pattern=pattern, proxy_pass=proxy_pass)


def chosen(matcher: LocationMatcher, uri: str) -> str | None:
    found = matcher.match(uri)
    return None if found is None else f"{found.modifier} {found.pattern}".strip()


# the example of nginx's "location" documentation, A..E
DOCS_EXAMPLE = LocationMatcher(
    [
        loc("=", "/"),
        loc("", "/"),
        loc("", "/documents/"),
        loc("^~", "/images/"),
        loc("~*", r"\.(gif|jpg|jpeg)$"),
    ]
)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/", "= /"),
        ("/index.html", "/"),
        ("/documents/document.html", "/documents/"),
        ("/images/1.gif", "^~ /images/"),
        ("/documents/1.jpg", r"~* \.(gif|jpg|jpeg)$"),
        ("/documents/1.JPG", r"~* \.(gif|jpg|jpeg)$"),
        ("/Documents/x", "/"),  # prefixes are case-sensitive
        ("/documents", "/"),  # shorter than the prefix: not a match, and it does not proxy
    ],
)
def test_nginx_documentation_example(uri: str, expected: str) -> None:
    assert chosen(DOCS_EXAMPLE, uri) == expected


def test_regexes_in_declaration_order_first_match_wins() -> None:
    matcher = LocationMatcher([loc("~", r"/api/"), loc("~", r"/api/v2/"), loc("", "/api/v2/")])
    assert chosen(matcher, "/api/v2/x") == "~ /api/"


def test_regex_beats_a_longer_plain_prefix() -> None:
    matcher = LocationMatcher([loc("", "/static/css/"), loc("~", r"\.css$")])
    assert chosen(matcher, "/static/css/site.css") == r"~ \.css$"
    assert chosen(matcher, "/static/css/site.txt") == "/static/css/"


def test_caret_tilde_only_stops_regexes_when_it_is_the_longest_prefix() -> None:
    matcher = LocationMatcher([loc("^~", "/a/"), loc("", "/a/b/"), loc("~", r"\.jpg$")])
    assert chosen(matcher, "/a/x.jpg") == "^~ /a/"
    assert chosen(matcher, "/a/b/x.jpg") == r"~ \.jpg$"  # /a/b/ is longer and not ^~
    assert chosen(matcher, "/a/b/x.png") == "/a/b/"


def test_exact_match_beats_everything_but_only_when_equal() -> None:
    matcher = LocationMatcher([loc("~", "."), loc("=", "/x"), loc("^~", "/x")])
    assert chosen(matcher, "/x") == "= /x"
    assert chosen(matcher, "/x/") == "^~ /x"
    assert chosen(matcher, "/y") == "~ ."


def test_case_sensitive_and_insensitive_regexes() -> None:
    matcher = LocationMatcher([loc("~", r"^/Up$"), loc("~*", r"^/low$")])
    assert chosen(matcher, "/Up") == "~ ^/Up$"
    assert chosen(matcher, "/up") is None
    assert chosen(matcher, "/LOW") == "~* ^/low$"


def test_no_match_is_none() -> None:
    matcher = LocationMatcher([loc("", "/api/"), loc("=", "/x")])
    assert matcher.match("/other") is None
    assert matcher.match("") is None


def test_first_declaration_of_a_duplicate_prefix_wins() -> None:
    first, second = loc("", "/a"), loc("", "/a")
    assert LocationMatcher([first, second]).match("/a/b") is first


def test_named_locations_are_never_matched_by_uri() -> None:
    named = loc("", "@fallback")
    matcher = LocationMatcher([named, loc("", "/")])
    assert chosen(matcher, "@fallback") is None
    assert chosen(matcher, "/@fallback") == "/"
    assert matcher.named == {"@fallback": named}


def test_pcre_named_groups_are_accepted() -> None:
    matcher = LocationMatcher([loc("~", r"^/u/(?<user>\w+)$")])
    assert chosen(matcher, "/u/bob") == r"~ ^/u/(?<user>\w+)$"
    assert compile_nginx_regex(r"(?<=a)b").search("ab") is not None  # lookbehind untouched
    with pytest.raises(re.error):
        compile_nginx_regex("(")


def test_auto_redirect_to_the_slash_form_of_a_proxied_location() -> None:
    matcher = LocationMatcher([loc("", "/"), loc("", "/app/", proxied=True), loc("~", "app$")])
    found = matcher.match("/app")  # the redirect wins over the regex that matches "/app"
    assert found is not None and found.return_ is not None
    assert found.return_.status == 301
    assert found.return_.text is not None
    assert found.return_.text.parts == ("/app/", Var("is_args"), Var("args"))
    assert found.proxy_pass is None
    # the slash form itself goes to the location; a non-proxied location never redirects
    assert chosen(matcher, "/app/") == "/app/"
    assert chosen(LocationMatcher([loc("", "/"), loc("", "/app/")]), "/app") == "/"


def test_no_auto_redirect_when_a_location_equals_the_uri() -> None:
    matcher = LocationMatcher([loc("", "/app"), loc("", "/app/", proxied=True)])
    assert chosen(matcher, "/app") == "/app"
    exact = LocationMatcher([loc("=", "/app"), loc("", "/app/", proxied=True)])
    assert chosen(exact, "/app") == "= /app"


def test_auto_redirect_for_an_exact_proxied_location() -> None:
    matcher = LocationMatcher([loc("=", "/x/", proxied=True)])
    found = matcher.match("/x")
    assert found is not None and found.return_ is not None and found.return_.status == 301


# --------------------------------------------------------------------------- Host


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        ("example.com", "example.com"),
        ("Example.COM:8080", "example.com"),
        ("example.com.", "example.com"),
        ("example.com.:80", "example.com"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("", None),
        (":80", None),
        (".", None),
        ("a..b", None),
        ("a/b", None),
        ("a\\b", None),
        ("a\x00b", None),
    ],
)
def test_normalize_host(raw: str, host: str | None) -> None:
    assert normalize_host(raw) == host


def server(*names: str, port: int = 80, default: bool = False) -> ServerConf:
    return ServerConf(
        listens=(ListenConf(host="0.0.0.0", port=port, default_server=default),),
        server_names=names,
        locations=(),
    )


FIRST = server("first.test")
EXACT = server("www.example.com", "example.com")
HEAD = server("*.example.com")
HEAD_LONGER = server("*.api.example.com")
TAIL = server("www.example.*")
TAIL_LONGER = server("mail.example.co.*")
DOT = server(".example.org")
REGEX_1 = server(r"~^(?<user>\w+)\.example\.net$")
REGEX_2 = server(r"~\.net$")
UPPER_REGEX = server(r"~^CAPS\.test$")
EMPTY = server("")
SELECTOR = ServerSelector(
    [FIRST, EXACT, HEAD, HEAD_LONGER, TAIL, TAIL_LONGER, DOT, REGEX_1, REGEX_2, UPPER_REGEX, EMPTY]
)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("www.example.com", EXACT),
        ("example.com", EXACT),
        ("a.example.com", HEAD),
        ("a.b.example.com", HEAD),
        ("x.api.example.com", HEAD_LONGER),
        ("api.example.com", HEAD),  # "*.api.example.com" needs a label before api
        ("www.example.org", DOT),
        ("example.org", DOT),
        ("bob.example.net", REGEX_1),
        ("www.example.net", TAIL),  # wildcards are tried before regexes
        ("a.b.net", REGEX_2),
        ("www.example.co.uk", TAIL),
        ("mail.example.co.uk", TAIL_LONGER),
        ("www.example", FIRST),  # a tail wildcard needs something after its dot
        ("caps.test", UPPER_REGEX),
        ("", EMPTY),
        (None, EMPTY),
        ("unknown.test", FIRST),
    ],
)
def test_server_selection_order(host: str | None, expected: ServerConf) -> None:
    assert SELECTOR.select(host) is expected


def test_exact_name_beats_wildcards_and_regexes() -> None:
    exact = server("a.example.com")
    selector = ServerSelector([server(r"~example"), server("*.example.com"), exact])
    assert selector.select("a.example.com") is exact


def test_head_wildcard_beats_tail_wildcard_beats_regex() -> None:
    regex, tail, head = server(r"~^www\."), server("www.example.*"), server("*.example.com")
    selector = ServerSelector([regex, tail, head])
    assert selector.select("www.example.com") is head
    assert selector.select("www.example.org") is tail
    assert selector.select("www.other.org") is regex


def test_first_server_keeps_a_conflicting_name() -> None:
    one, two = server("same.test"), server("same.test")
    assert ServerSelector([one, two]).select("same.test") is one


def test_default_server_and_listen_grouping() -> None:
    a = server("a.test", port=80)
    b = server("b.test", port=80, default=True)
    c = server("c.test", port=81)
    http = HttpConf(upstreams={}, servers=(a, b, c), log_formats={})
    selectors = selectors_by_listen(http)
    assert set(selectors) == {("0.0.0.0", 80, None), ("0.0.0.0", 81, None)}
    on_80 = selectors[("0.0.0.0", 80, None)]
    assert on_80.select("unknown") is b
    assert on_80.select("a.test") is a
    assert on_80.select("c.test") is b  # c listens elsewhere
    assert on_80.select(None) is b  # no server named "": the default
    assert selectors[("0.0.0.0", 81, None)].select("a.test") is c


def test_selector_needs_a_server() -> None:
    with pytest.raises(ValueError):
        ServerSelector([])
