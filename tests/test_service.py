"""Running scriptlb as a service: default pid file and prefix, missing logs/, --help, --demo,
systemd readiness (sd_notify), ``user``, and the packaged default config."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import answers, free_ports, wait_for

from scriptlb import cli, config
from scriptlb.config import ConfigError, default_prefix, package_prefix
from scriptlb.hookrt import hooks
from scriptlb.process import service

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scriptlb", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=30, env=env)


def small_conf(port: int, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        daemon off;
        error_log logs/error.log notice;
        {extra}
        events {{}}
        http {{
            server {{
                listen 127.0.0.1:{port};
                access_log logs/access.log;
                location / {{ return 200 "up\\n"; }}
            }}
        }}
        """)


# --------------------------------------------------------------------------- config defaults


def test_pid_defaults_to_logs_under_the_prefix(tmp_path: Path) -> None:
    conf_file = tmp_path / "a.conf"
    conf_file.write_text("events {}\n")
    conf = config.load(str(conf_file), str(tmp_path))
    assert conf.pid == str(tmp_path / "logs" / "scriptlb.pid")


def test_default_prefix_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # no conf/scriptlb.conf here: the package's prefix (which has it), for -c too
    assert default_prefix(None) == package_prefix()
    assert default_prefix("conf/scriptlb.conf") == package_prefix()
    assert default_prefix("my.conf") == str(tmp_path)  # nowhere: errors name the cwd's path
    (tmp_path / "my.conf").write_text("events {}\n")
    assert default_prefix("my.conf") == str(tmp_path)
    assert default_prefix("/abs/other.conf") == str(tmp_path)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "scriptlb.conf").write_text("events {}\n")
    assert default_prefix(None) == str(tmp_path)


def test_the_package_ships_the_default_config_and_hooks() -> None:
    prefix = Path(package_prefix())
    assert (prefix / "conf" / "scriptlb.conf").read_text() == (ROOT / "conf" / "scriptlb.conf").read_text()
    assert (prefix / "hooks" / "sticky.py").is_file()
    conf = hooks.load_and_check(str(prefix / "conf" / "scriptlb.conf"), str(prefix))
    assert conf.http is not None and "backend" in conf.http.upstreams


def test_user_directive(tmp_path: Path) -> None:
    conf_file = tmp_path / "a.conf"
    if os.geteuid() != 0:
        conf_file.write_text("user nobody;\nevents {}\n")
        conf = config.load(str(conf_file), str(tmp_path))
        assert conf.user is None
        assert any('the "user" directive makes sense only' in w for w in conf.warnings)
        return
    conf_file.write_text("user nobody;\nevents {}\n")
    conf = config.load(str(conf_file), str(tmp_path))
    import pwd

    entry = pwd.getpwnam("nobody")
    assert conf.user == (entry.pw_uid, entry.pw_gid)
    conf_file.write_text("events {}\nuser no-such-user-here;\n")
    with pytest.raises(ConfigError) as err:
        config.load(str(conf_file), str(tmp_path))
    assert str(err.value) == f'[emerg] getpwnam("no-such-user-here") failed in {conf_file}:2'


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("flag", ["--help", "-h", "-?"])
def test_help_prints_the_usage(flag: str) -> None:
    result = run_cli(flag, cwd=ROOT)
    assert result.returncode == 0
    assert "Usage: scriptlb [-?hvVtTq]" in result.stderr
    assert "--demo" in result.stderr


def test_unknown_long_option_is_refused() -> None:
    with pytest.raises(cli.UsageError, match='invalid option: "-"'):
        cli.parse_options(["--helpme"])


def test_fresh_directory_runs_and_reloads_without_pid_directive(tmp_path: Path) -> None:
    # no logs/ yet and no `pid` directive: logs/ is created, the pid file is logs/scriptlb.pid,
    # and `-s reload` / `-s quit` find the master through it
    port = free_ports(1)[0]
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "scriptlb.conf").write_text(small_conf(port))
    proc = subprocess.Popen([sys.executable, "-m", "scriptlb", "-c", "conf/scriptlb.conf"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: answers(port) == "up\n", what="first answer")
        pid_file = tmp_path / "logs" / "scriptlb.pid"
        assert pid_file.read_text() == f"{proc.pid}\n"
        assert run_cli("-s", "reload", cwd=tmp_path).returncode == 0
        wait_for(lambda: "reconfiguring" in (tmp_path / "logs" / "error.log").read_text(), what="reload")
        assert (tmp_path / "logs" / "access.log").exists()
        assert run_cli("-s", "quit", cwd=tmp_path).returncode == 0
        assert proc.wait(timeout=15) == 0
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            proc.wait(timeout=15)


def test_demo_runs_the_packaged_config_in_a_temporary_prefix(tmp_path: Path) -> None:
    ports = (8080, 9001, 9002, 9003)
    for port in ports:  # the shipped config's fixed ports
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is in use on this machine")
    proc = subprocess.Popen([sys.executable, "-m", "scriptlb", "--demo"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (answers(8080) or "").startswith("backend 90"), what="the demo's rotation")
        bodies = {answers(8080) for _ in range(6)}
        assert bodies == {"backend 9001\n", "backend 9002\n", "backend 9003\n"}
        assert not (tmp_path / "logs").exists()  # nothing written where it was started
    finally:
        proc.send_signal(signal.SIGQUIT)
        _, err = proc.communicate(timeout=15)
    prefix = err.split("with prefix ")[1].split(";")[0]
    assert prefix.startswith("/") and "scriptlb-demo-" in prefix
    shutil.rmtree(prefix, ignore_errors=True)


# --------------------------------------------------------------------------- systemd


def test_sd_notify_ready_reloading_stopping(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "scriptlb.conf").write_text(small_conf(port))
    notify_path = str(tmp_path / "notify")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(notify_path)
    sink.settimeout(15)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    proc = subprocess.Popen([sys.executable, "-m", "scriptlb"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert sink.recv(4096).decode() == f"READY=1\nMAINPID={proc.pid}"
        proc.send_signal(signal.SIGHUP)
        assert sink.recv(4096).decode().startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert sink.recv(4096) == b"READY=1"
        proc.send_signal(signal.SIGQUIT)
        assert sink.recv(4096) == b"STOPPING=1"
        assert proc.wait(timeout=15) == 0
    finally:
        sink.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_notify_without_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert service.notify("READY=1") is False


def test_unit_file_and_dockerfile_say_what_they_must() -> None:
    unit = (ROOT / "contrib" / "scriptlb.service").read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "KillMode=mixed", "KillSignal=SIGQUIT"):
        assert line in unit
    docker = (ROOT / "Dockerfile").read_text()
    assert "USER scriptlb" in docker and "useradd" in docker


# --------------------------------------------------------------------------- user


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_workers_run_as_the_configured_user() -> None:
    import pwd
    import tempfile

    nobody = pwd.getpwnam("nobody")
    port = free_ports(1)[0]
    # a prefix the user can reach (pytest's tmp_path sits under a 0700 directory)
    tmp_path = Path(tempfile.mkdtemp(prefix="scriptlb-user-"))
    tmp_path.chmod(0o755)
    (tmp_path / "conf").mkdir()
    text = small_conf(port, "user nobody;").replace('return 200 "up\\n";', 'return 200 "$pid\\n";')
    (tmp_path / "conf" / "scriptlb.conf").write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "scriptlb"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = wait_for(lambda: answers(port), what="first answer")
        worker_pid = int(str(body).strip())
        status = Path(f"/proc/{worker_pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(nobody.pw_uid)] * 4
        master_uid = next(x for x in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                          if x.startswith("Uid:"))
        assert master_uid.split()[1] == "0"  # the master keeps root: binding and reloading
        assert os.stat(tmp_path / "logs" / "access.log").st_uid == nobody.pw_uid
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(timeout=15)
        shutil.rmtree(tmp_path, ignore_errors=True)
