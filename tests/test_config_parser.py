"""Parser: block structure, include (globs, nesting, relative to the main file), -g params."""

from __future__ import annotations

from pathlib import Path

import pytest

from scriptlb.config.errors import ConfigError
from scriptlb.config.parser import Node, parse


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def names(nodes: tuple[Node, ...] | None) -> list[str]:
    return [n.name for n in nodes or ()]


def parse_error(conf: Path, params: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(str(conf), params)
    return str(info.value)


def test_tree_with_blocks_and_sources(tmp_path: Path) -> None:
    conf = write(tmp_path / "x.conf", "a 1;\nhttp {\n  server {\n    listen 80;\n  }\n}\n")
    result = parse(str(conf))
    a, http = result.nodes
    assert (a.name, a.args, a.children, a.source.line) == ("a", ("1",), None, 1)
    assert (http.name, http.source.line, http.close and http.close.line) == ("http", 2, 6)
    [server] = http.children or ()
    assert names(server.children) == ["listen"]
    assert server.children and server.children[0].source == type(a.source)(str(conf), 4)
    assert result.files == [str(conf)]


def test_unbalanced_braces(tmp_path: Path) -> None:
    conf = write(tmp_path / "x.conf", "events {}\n}\n")
    assert parse_error(conf) == f'[emerg] unexpected "}}" in {conf}:2'
    conf = write(tmp_path / "y.conf", "events {\n\n")
    assert parse_error(conf) == f'[emerg] unexpected end of file, expecting "}}" in {conf}:3'


def test_include_glob_is_sorted_and_relative_to_the_main_file(tmp_path: Path) -> None:
    write(tmp_path / "conf" / "sites" / "b.conf", "b;\n")
    write(tmp_path / "conf" / "sites" / "a.conf", "a;\n")
    write(tmp_path / "conf" / "sites" / "c.txt", "ignored;\n")
    main = write(tmp_path / "conf" / "main.conf", "first;\nhttp { include sites/*.conf; }\nlast;\n")
    result = parse(str(main))
    assert names(result.nodes) == ["first", "http", "last"]
    assert names(result.nodes[1].children) == ["a", "b"]
    sites = tmp_path / "conf" / "sites"
    assert result.files == [str(main), str(sites / "a.conf"), str(sites / "b.conf")]
    assert result.nodes[1].children and result.nodes[1].children[0].source.file == str(sites / "a.conf")


def test_nested_includes_and_absolute_paths(tmp_path: Path) -> None:
    inner = write(tmp_path / "elsewhere" / "inner.conf", "inner;\n")
    write(tmp_path / "conf" / "mid.conf", f"mid;\ninclude {inner};\n")
    main = write(tmp_path / "conf" / "main.conf", "include mid.conf;\nend;\n")
    assert names(parse(str(main)).nodes) == ["mid", "inner", "end"]


def test_include_of_a_glob_matching_nothing_is_fine(tmp_path: Path) -> None:
    main = write(tmp_path / "main.conf", "include none/*.conf;\nx;\n")
    assert names(parse(str(main)).nodes) == ["x"]


def test_missing_include_and_missing_main_file(tmp_path: Path) -> None:
    main = write(tmp_path / "main.conf", "\ninclude nofile.conf;\n")
    assert parse_error(main) == (
        f'[emerg] open() "{tmp_path}/nofile.conf" failed (2: No such file or directory) in {main}:2'
    )
    missing = tmp_path / "nope.conf"
    assert parse_error(missing) == f'[emerg] open() "{missing}" failed (2: No such file or directory)'


def test_included_file_must_be_balanced_on_its_own(tmp_path: Path) -> None:
    inc = write(tmp_path / "inc.conf", "x;\n}\n")
    main = write(tmp_path / "main.conf", "http {\ninclude inc.conf;\n}\n")
    assert parse_error(main) == f'[emerg] unexpected "}}" in {inc}:2'


def test_include_argument_errors(tmp_path: Path) -> None:
    main = write(tmp_path / "main.conf", "include a b;\n")
    assert parse_error(main) == f'[emerg] invalid number of arguments in "include" directive in {main}:1'
    main = write(tmp_path / "main.conf", "include a {}\n")
    assert parse_error(main) == f'[emerg] directive "include" is not terminated by ";" in {main}:1'


def test_recursive_include_is_stopped(tmp_path: Path) -> None:
    main = write(tmp_path / "main.conf", "include main.conf;\n")
    assert "recursive include" in parse_error(main)


def test_params_come_first_and_refuse_blocks(tmp_path: Path) -> None:
    main = write(tmp_path / "main.conf", "b;\n")
    result = parse(str(main), "a 1; c;")
    assert names(result.nodes) == ["a", "c", "b"]
    assert str(result.nodes[0].source) == "command line:0"
    assert parse_error(main, "http {}") == (
        "[emerg] block directives are not supported in -g option in command line"
    )


def test_python_block_node_carries_code(tmp_path: Path) -> None:
    main = write(tmp_path / "main.conf", "upstream u {\n  balancer_by_python_block {\n    x = '}'\n  }\n}\n")
    [up] = parse(str(main)).nodes
    [hook] = up.children or ()
    assert (hook.code, hook.code_line, hook.source.line) == ("x = '}'\n", 3, 2)
    assert hook.children == () and hook.close is not None and hook.close.line == 4
