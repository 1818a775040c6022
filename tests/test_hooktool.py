"""`scriptlb hook run FILE ...`: one JSON line per run, exit status 0 only for ok/exit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import scriptlb_cmd

from scriptlb.testing import hooktool

ROOT = Path(__file__).resolve().parent.parent


def hook_run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = hooktool.main(["run", *args])
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one line
    return code, json.loads(out)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "hook.py"
    path.write_text(text)
    return str(path)


def test_ok_with_everything_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hook = write(tmp_path, """\
state, status = balancer.get_last_failure()
ngx.log(ngx.WARN, "last: ", state, " ", status, " uri ", ngx.var.uri, " ua ", ngx.var.http_user_agent)
balancer.set_current_peer(upstream.get_primary_peers()[1]["name"], None, "api.example")
balancer.set_more_tries(1)
balancer.set_timeouts(1.5, None, 3)
balancer.enable_keepalive(30, 10)
ngx.ctx["method"] = ngx.var.request_method
""")
    code, result = hook_run(capsys, hook, "--uri", "/a?x=1", "--method", "POST",
                            "--header", "User-Agent: t/1", "--peers", "127.0.0.1:9001,127.0.0.1:9002",
                            "--last-failure", "failed:502")
    assert code == 0
    assert result == {
        "outcome": "ok", "peer": "127.0.0.1:9002", "host": "api.example", "more_tries": 1,
        "timeouts": {"connect": 1.5, "send": 60.0, "read": 3.0}, "exit_status": None,
        "keepalive": [30.0, 10], "ctx": {"method": "POST"},
        "logs": [f"[warn] [python] {hook}:2: last: failed 502 uri /a ua t/1"], "error": None,
    }


def test_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = hook_run(capsys, write(tmp_path, "ngx.exit(403)\n"))
    assert (code, result["outcome"], result["exit_status"], result["peer"]) == (0, "exit", 403, None)


@pytest.mark.parametrize(("text", "outcome", "error"), [
    ("x = (\n", "compile_error", "SyntaxError: '(' was never closed in {hook}:1"),
    ("x = ().__class__\n", "compile_error", 'SandboxError: "__class__" is an invalid attribute name'),
    ("x = 1 / 0\n", "runtime_error", "failed to run balancer_by_python: {hook}:1: ZeroDivisionError"),
    ("while True:\n    pass\n", "timeout", "balancer_by_python timed out after 10ms at {hook}:"),
    ("ngx.exit(200)\n", "runtime_error", "ngx.exit(200) in a balancer hook, falling back"),
])
def test_failures_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, outcome: str,
                         error: str) -> None:
    hook = write(tmp_path, text)
    code, result = hook_run(capsys, hook)
    assert (code, result["outcome"], result["peer"]) == (1, outcome, None)
    assert error.format(hook=hook) in result["error"]
    assert result["logs"] == [f"[error] {result['error']}"]


def test_no_peer_is_ok_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = hook_run(capsys, write(tmp_path, "x = 1\n"))
    assert (code, result["outcome"], result["peer"]) == (0, "ok", None)
    assert result["error"] == "no peer set: the try falls back to the upstream's balancer"


def test_timeout_option_and_package_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "peers.py").write_text("PICK = '127.0.0.1:7000'\n")
    hook = write(tmp_path, "import peers\nbalancer.set_current_peer(peers.PICK)\n")
    code, result = hook_run(capsys, hook, "--package-path", str(tmp_path / "lib" / "?.py"), "--timeout", "50")
    assert (code, result["peer"]) == (0, "127.0.0.1:7000")


@pytest.mark.parametrize("name", ["hash_by_uri", "sticky", "retry_other_peer", "per_path_timeouts", "canary",
                                  "deny"])
def test_example_hooks_run(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = hook_run(capsys, str(ROOT / "hooks" / f"{name}.py"), "--uri", "/x",
                            "--peers", "127.0.0.1:9001,127.0.0.1:9002,127.0.0.1:9003")
    assert code == 0
    assert result["outcome"] == "ok"
    assert result["peer"] in ("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003")


def test_example_with_a_package_module(capsys: pytest.CaptureFixture[str]) -> None:
    code, result = hook_run(capsys, str(ROOT / "hooks" / "consistent_hash.py"), "--uri", "/x",
                            "--package-path", str(ROOT / "hooks" / "lib" / "?.py"))
    assert (code, result["outcome"], result["peer"]) == (0, "ok", "127.0.0.1:8080")


def test_backup_peers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hook = write(tmp_path, "b = upstream.get_backup_peers()\n"
                           "ngx.ctx['b'] = [(p['name'], p['backup']) for p in b]\n"
                           "balancer.set_current_peer(b[0]['name'])\n")
    code, result = hook_run(capsys, hook, "--peers", "127.0.0.1:1",
                            "--backup-peers", "127.0.0.1:2,127.0.0.1:3")
    assert (code, result["peer"]) == (0, "127.0.0.1:2")
    assert result["ctx"] == {"b": [["127.0.0.1:2", True], ["127.0.0.1:3", True]]}


def test_cli_dispatch(tmp_path: Path) -> None:
    hook = write(tmp_path, "balancer.set_current_peer('127.0.0.1:9001')\n")
    done = subprocess.run(scriptlb_cmd("hook", "run", hook), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["peer"] == "127.0.0.1:9001"
    done = subprocess.run(scriptlb_cmd("hook", "run", write(tmp_path, "1/0\n")), capture_output=True,
                          text=True, timeout=30)
    assert (done.returncode, json.loads(done.stdout)["outcome"]) == (1, "runtime_error")


def test_bad_arguments() -> None:
    with pytest.raises(SystemExit) as err:
        hooktool.main(["run", "x.py", "--last-failure", "oops"])
    assert err.value.code == 2


# --------------------------------------------------------------------------- --conf, --tries, --phase log


def hook_lines(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict]]:
    code = hooktool.main(["run", *args])
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


BLOCK_CONF = """
events {}
http {
    upstream other { server 127.0.0.1:1; }
    upstream api {
        server 127.0.0.1:7001;
        server 127.0.0.1:7002;
        balancer_by_python_block {
            peers = upstream.get_primary_peers()
            balancer.set_current_peer(peers[1 if ngx.var.remote_addr == "10.0.0.2" else 0]["name"])
        }
    }
    server {
        listen 127.0.0.1:1;
        location / { proxy_pass http://api; proxy_connect_timeout 2s; }
    }
}
"""


def test_conf_block_and_remote_addr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "block.conf"
    conf.write_text(BLOCK_CONF)
    code, result = hook_run(capsys, "--conf", str(conf), "--upstream", "api", "--remote-addr", "10.0.0.2")
    assert (code, result["peer"]) == (0, "127.0.0.1:7002")
    assert result["timeouts"]["connect"] == 2.0  # the location's proxy_connect_timeout
    code, result = hook_run(capsys, "--conf", str(conf), "--upstream", "api")
    assert (code, result["peer"]) == (0, "127.0.0.1:7001")


def test_conf_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "block.conf"
    conf.write_text(BLOCK_CONF)
    assert hooktool.main(["run", "--conf", str(conf), "--upstream", "nosuch"]) == 1
    assert 'no upstream "nosuch"' in capsys.readouterr().err
    bad = tmp_path / "bad.conf"
    bad.write_text("events {}\nhttp {\n  upstream a { server 127.0.0.1:1 weight=0; }\n}\n")
    assert hooktool.main(["run", "--conf", str(bad)]) == 1
    assert f"in {bad}:3" in capsys.readouterr().err
    for argv in (["run"], ["run", "x.py", "--conf", str(conf)], ["run", "x.py", "--fail", "oops"],
                 ["run", "x.py", "--phase", "log", "--var", "nosuch=1"]):
        with pytest.raises(SystemExit) as err:
            hooktool.main(argv)
        assert err.value.code == 2


def test_tries_walk_a_request(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = hook_lines(capsys, str(ROOT / "hooks" / "retry_other_peer.py"), "--uri", "/a",
                             "--peers", "127.0.0.1:9001,127.0.0.1:9002,127.0.0.1:9003",
                             "--tries", "3", "--fail", "502", "--fail", "timeout")
    assert code == 0
    assert [(line["peer"], line["chosen_by"], line["status"]) for line in lines[:-1]] == [
        ("127.0.0.1:9001", "hook", 502), ("127.0.0.1:9002", "hook", 504), ("127.0.0.1:9003", "hook", 200)]
    assert lines[1]["hook"]["logs"][0].endswith("127.0.0.1:9001 failed (failed 502), trying the next peer")
    assert lines[-1] == {"status": 200, "tries": 3}
    code, lines = hook_lines(capsys, str(ROOT / "hooks" / "hash_by_uri.py"), "--tries", "2",
                             "--peers", "127.0.0.1:9001,127.0.0.1:9002,127.0.0.1:9003",
                             "--fail", "error", "--fail", "error", "--fail", "error")
    assert lines[-1] == {"status": 502, "tries": 2}  # at most N tries, then nginx's 502


def test_tries_with_a_failing_hook_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = hook_lines(capsys, write(tmp_path, "1 / 0\n"), "--tries", "1")
    assert code == 1 and lines[0]["chosen_by"] == "fallback(runtime_error): round_robin"
    assert lines[0]["peer"] == "127.0.0.1:8080" and lines[-1]["status"] == 200


def test_log_phase(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hook = write(tmp_path, 'ngx.log(ngx.WARN, ngx.var.status, " ", ngx.var.upstream_addr, " ",\n'
                           '        ngx.var.upstream_status, " ", ngx.var.request_time)\n')
    code, result = hook_run(capsys, hook, "--phase", "log", "--var", "status=502",
                            "--var", "upstream_addr=127.0.0.1:9001, 127.0.0.1:9002",
                            "--var", "upstream_status=502, 200", "--var", "request_time=0.25")
    assert (code, result["outcome"]) == (0, "ok")
    assert result["logs"] == [f"[warn] [python] {hook}:1: 502 127.0.0.1:9001, 127.0.0.1:9002 502, 200 0.250"]
    code, result = hook_run(capsys, write(tmp_path, "1 / 0\n"), "--phase", "log")
    assert (code, result["outcome"]) == (1, "runtime_error")
