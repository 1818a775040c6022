"""The command line through real processes (``python -m scriptlb``), plus option parsing."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from scriptlb import cli
from scriptlb.config import ConfigError
from scriptlb.config.model import MainConf, Source
from scriptlb.hookrt import hooks

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scriptlb", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=30,
    )


def write_conf(tmp_path: Path, text: str, name: str = "conf/t.conf") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- -t / -T


def test_default_config_passes_t() -> None:
    conf = ROOT / "conf" / "scriptlb.conf"
    result = run("-t", "-p", str(ROOT))
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        f"scriptlb: the configuration file {conf} syntax is ok\n"
        f"scriptlb: configuration file {conf} test is successful\n"
    )
    assert result.stdout == ""


def test_examples_pass_t() -> None:
    # every shipped example, including the hook examples (their hooks compile under -t)
    confs = [c for folder in ("examples", "hooks") for c in sorted((ROOT / "conf" / folder).glob("*.conf"))]
    assert {"sticky_cookie.conf", "chash_by_header.conf", "rate_aware.conf"} <= {c.name for c in confs}
    for conf in confs:
        result = run("-t", "-p", str(ROOT), "-c", str(conf))
        assert result.returncode == 0, (conf, result.stderr)


def test_t_reports_the_error_with_file_and_line(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "events {}\nhttp {\n    fooo on;\n}\n")
    result = run("-t", "-p", str(tmp_path), "-c", "conf/t.conf")
    assert result.returncode == 1
    assert result.stderr == (
        f'scriptlb: [emerg] unknown directive "fooo" in {conf}:3\n'
        f"scriptlb: configuration file {conf} test failed\n"
    )


def test_t_with_a_missing_file(tmp_path: Path) -> None:
    result = run("-t", "-p", str(tmp_path))
    missing = tmp_path / "conf" / "scriptlb.conf"  # the default -c, under the prefix
    assert result.returncode == 1
    assert result.stderr == (
        f'scriptlb: [emerg] open() "{missing}" failed (2: No such file or directory)\n'
        f"scriptlb: configuration file {missing} test failed\n"
    )


def test_q_silences_success_but_not_warnings_or_errors(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "http { proxy_next_upstream error error; }\n")
    result = run("-tq", "-p", str(tmp_path), "-c", "conf/t.conf")
    assert result.returncode == 0
    assert result.stderr == f'scriptlb: [warn] duplicate value "error" in {conf}:1\n'


def test_g_adds_main_directives_and_reports_command_line_errors(tmp_path: Path) -> None:
    write_conf(tmp_path, "daemon off;\n")
    ok = run("-t", "-p", str(tmp_path), "-c", "conf/t.conf", "-g", "worker_processes 2;")
    assert ok.returncode == 0, ok.stderr
    bad = run("-t", "-p", str(tmp_path), "-c", "conf/t.conf", "-g", "worker_processes 2")
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[0] == (
        'scriptlb: [emerg] unexpected end of parameter, expecting ";" in command line'
    )


def test_T_dumps_every_file_after_the_test(tmp_path: Path) -> None:
    main = write_conf(tmp_path, "events {}\ninclude inc/*.conf;")
    a = write_conf(tmp_path, "# a\n", "conf/inc/a.conf")
    b = write_conf(tmp_path, "# b", "conf/inc/b.conf")
    result = run("-T", "-p", str(tmp_path), "-c", str(main))
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    # nginx's layout: a header per file, its bytes, then a newline
    assert result.stdout == (
        f"# configuration file {main}:\nevents {{}}\ninclude inc/*.conf;\n"
        f"# configuration file {a}:\n# a\n\n"
        f"# configuration file {b}:\n# b\n"
    )


def test_T_dumps_nothing_when_the_test_fails(tmp_path: Path) -> None:
    write_conf(tmp_path, "fooo;\n")
    result = run("-T", "-p", str(tmp_path), "-c", "conf/t.conf")
    assert result.returncode == 1 and result.stdout == ""


# --------------------------------------------------------------------------- -v -V -h, options


def test_version() -> None:
    result = run("-v")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "scriptlb version: scriptlb/0.1.0\n")


def test_build_information() -> None:
    lines = run("-V").stderr.splitlines()
    assert lines[0] == "scriptlb version: scriptlb/0.1.0"
    assert lines[1].startswith(f"built with Python {sys.version_info[0]}.{sys.version_info[1]}")
    for dep in ("uvloop", "httptools", "RestrictedPython"):
        assert dep in lines[1]


def test_help() -> None:
    result = run("-h")
    assert result.returncode == 0
    assert result.stderr.startswith("scriptlb version: scriptlb/0.1.0\nUsage: scriptlb")
    assert "-s signal" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-x"], 'invalid option: "x"'),
        (["foo"], 'invalid option: "foo"'),
        (["-c"], 'option "-c" requires file name'),
        (["-p"], 'option "-p" requires directory name'),
        (["-g"], 'option "-g" requires parameter'),
        (["-s"], 'option "-s" requires parameter'),
        (["-s", "restart"], 'invalid option: "-s restart"'),
    ],
)
def test_bad_options(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(args) == 1
    assert capsys.readouterr().err == f"scriptlb: {message}\n"


def test_option_grammar_glued_and_separate() -> None:
    opts = cli.parse_options(["-tq", "-cfile.conf", "-p", "/srv", "-g", "daemon off;", "-sreload"])
    assert (opts.test, opts.quiet, opts.conf, opts.prefix) == (True, True, "file.conf", "/srv")
    assert (opts.globals_, opts.signal, opts.dump) == ("daemon off;", "reload", False)
    assert cli.parse_options(["-T"]).dump and cli.parse_options(["-T"]).test


def test_v_with_t_shows_the_version_then_tests(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-v", "-t", "-p", str(ROOT)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("scriptlb version:") and "test is successful" in err


# --------------------------------------------------------------------------- dispatch


def test_t_compiles_hooks_through_scriptlb_hooks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = write_conf(tmp_path, "http { upstream u { balancer_by_python_block {\n  x = (\n} } }\n")
    seen: list[MainConf] = []

    def precompile(main: MainConf) -> None:
        seen.append(main)
        assert main.http is not None
        hook = main.http.upstreams["u"].hook
        assert hook is not None
        raise ConfigError("'(' was never closed", Source(hook.source.file, hook.first_line))

    monkeypatch.setattr(hooks, "precompile", precompile)
    assert cli.main(["-t", "-p", str(tmp_path), "-c", "conf/t.conf"]) == 1
    assert len(seen) == 1
    assert capsys.readouterr().err == (
        f"scriptlb: [emerg] '(' was never closed in {conf}:2\n"
        f"scriptlb: configuration file {conf} test failed\n"
    )


def test_run_and_signal_dispatch_to_master(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_conf(tmp_path, "daemon off;\n")
    calls: list[tuple[str, object]] = []
    fake = types.SimpleNamespace(
        run=lambda conf, globals_: calls.append(("run", (conf.daemon, conf.master_process, globals_))) or 0,
        send_signal=lambda conf, name: calls.append(("signal", name)) or 3,
    )
    monkeypatch.setitem(sys.modules, "scriptlb.process.master", fake)
    args = ["-p", str(tmp_path), "-c", "conf/t.conf", "-g", "master_process off;"]
    assert cli.main(args) == 0
    assert cli.main([*args, "-s", "reload"]) == 3
    assert calls == [("run", (False, False, "master_process off;")), ("signal", "reload")]


def test_run_with_a_bad_config_exits_1(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "fooo;\n")
    result = run("-p", str(tmp_path), "-c", "conf/t.conf")
    assert result.returncode == 1
    assert result.stderr == f'scriptlb: [emerg] unknown directive "fooo" in {conf}:1\n'


def test_hook_subcommand_dispatches_to_hooktool(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str]] = []
    fake = types.SimpleNamespace(main=lambda argv: received.append(argv) or 7)
    monkeypatch.setitem(sys.modules, "scriptlb.testing.hooktool", fake)
    assert cli.main(["hook", "run", "x.py", "--uri", "/a"]) == 7
    assert received == [["run", "x.py", "--uri", "/a"]]
