"""Command line, parsed the way nginx parses its own (``ngx_get_options``).

Flags may be glued (``-tq``, ``-cFILE``) or separate (``-c FILE``); everything the tool says
goes to stderr with the ``scriptlb: `` prefix, except ``-T``'s dump which goes to stdout.
This module only parses and dispatches: loading is ``scriptlb.config``, running and signals are
``scriptlb.process.master``, ``scriptlb hook ...`` is ``scriptlb.testing.hooktool``.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import TextIO

from scriptlb.config import ConfigError, MainConf, load, resolve_paths

PROG = "scriptlb"
SIGNALS = ("stop", "quit", "reopen", "reload")

USAGE = f"""Usage: {PROG} [-?hvVtTq] [-s signal] [-p prefix] [-c filename] [-g directives]
       {PROG} hook run FILE [options]   (run a balancer hook once; see `{PROG} hook run -h`)
       {PROG} replay --conf FILE LOG...  (a hook against recorded traffic; `{PROG} replay -h`)

Options:
  -?,-h,--help  : this help
  --demo        : run the shipped default config (a balancer on 127.0.0.1:8080 over three
                  demo backends) with a temporary prefix, in the foreground
  -v            : show version and exit
  -V            : show version and build information then exit
  -t            : test configuration and exit
  -T            : test configuration, dump it and exit
  -q            : suppress non-error messages during configuration testing
  -s signal     : send signal to a master process: stop, quit, reopen, reload
  -p prefix     : set prefix path (default: the current directory if it holds
                  conf/scriptlb.conf or -c is given, else the installed package's)
  -c filename   : set configuration file (default: conf/scriptlb.conf under the prefix)
  -g directives : set global directives out of configuration file
"""

# the only long options (nginx has none): --help as every tool, --demo to try it out
_LONG_OPTIONS = {"--help": "help", "--demo": "demo"}

# option letter -> (attribute, what nginx says is missing)
_VALUE_OPTIONS = {
    "p": ("prefix", "directory name"),
    "c": ("conf", "file name"),
    "g": ("globals_", "parameter"),
    "s": ("signal", "parameter"),
}


@dataclass
class Options:
    help: bool = False
    demo: bool = False
    version: bool = False
    build_info: bool = False
    test: bool = False
    dump: bool = False
    quiet: bool = False
    signal: str | None = None
    prefix: str | None = None
    conf: str | None = None
    globals_: str | None = None


class UsageError(Exception):
    pass


def parse_options(argv: list[str]) -> Options:
    """nginx's option grammar; raises UsageError with nginx's wording."""
    opts = Options()
    args = iter(argv)
    for arg in args:
        if arg in _LONG_OPTIONS:
            setattr(opts, _LONG_OPTIONS[arg], True)
            continue
        if not arg.startswith("-") or arg == "-":
            raise UsageError(f'invalid option: "{arg}"')
        letters = arg[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            if letter in _VALUE_OPTIONS:
                attr, what = _VALUE_OPTIONS[letter]
                value = letters or next(args, None)
                if value is None:
                    raise UsageError(f'option "-{letter}" requires {what}')
                if letter == "s" and value not in SIGNALS:
                    raise UsageError(f'invalid option: "-s {value}"')
                setattr(opts, attr, value)
                break
            if letter in "?h":
                opts.help = True
            elif letter == "v":
                opts.version = True
            elif letter == "V":
                opts.version = opts.build_info = True
            elif letter == "t":
                opts.test = True
            elif letter == "T":
                opts.test = opts.dump = True
            elif letter == "q":
                opts.quiet = True
            else:
                raise UsageError(f'invalid option: "{letter}"')
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "hook":
        return _hook_tool(argv[1:])
    if argv and argv[0] == "replay":
        return _tool("scriptlb.replay.cli", argv[1:])
    try:
        opts = parse_options(argv)
    except UsageError as e:
        say(str(e))
        return 1
    if opts.help or opts.version:
        _show_version(opts)
        if opts.help:
            sys.stderr.write(USAGE)
        if not opts.test:
            return 0
    if opts.test:
        return _test_config(opts)
    if opts.signal is not None:
        return _send_signal(opts)
    if opts.demo:
        _demo_paths(opts)
    return _run(opts)


def say(message: str, stream: TextIO | None = None) -> None:
    (stream or sys.stderr).write(f"{PROG}: {message}\n")


# --------------------------------------------------------------------------- actions


def _show_version(opts: Options) -> None:
    sys.stderr.write(f"{PROG} version: {PROG}/{_version(PROG)}\n")
    if opts.build_info:
        py = ".".join(str(n) for n in sys.version_info[:3])
        deps = ", ".join(f"{name} {_version(name)}" for name in ("uvloop", "httptools", "RestrictedPython"))
        sys.stderr.write(f"built with Python {py} ({deps})\n")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def load_and_check(conf_file: str, prefix: str | None = None, globals_: str | None = None) -> MainConf:
    """The config with its hooks compiled (``hooks.load_and_check``); the hook runtime is
    imported only by the commands that need it, so -v and -h stay quick."""
    from scriptlb.hookrt import hooks

    return hooks.load_and_check(conf_file, prefix, globals_)


def _test_config(opts: Options) -> int:
    conf_file, prefix = resolve_paths(opts.conf, opts.prefix)
    try:
        conf = load_and_check(conf_file, prefix, opts.globals_)
    except ConfigError as e:
        say(str(e))
        say(f"configuration file {conf_file} test failed")
        return 1
    for warning in conf.warnings:
        say(warning)
    if not opts.quiet:
        say(f"the configuration file {conf_file} syntax is ok")
        say(f"configuration file {conf_file} test is successful")
    if opts.dump:
        _dump(conf)
    return 0


def _dump(conf: MainConf) -> None:
    """nginx -T: each file read, under a header, followed by a newline."""
    out = sys.stdout
    for path in conf.files:
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except OSError as e:
            say(f'[alert] open() "{path}" failed ({e.errno}: {e.strerror})')
            continue
        out.write(f"# configuration file {path}:\n{text}\n")
    out.flush()


def _load_for_run(opts: Options, check_hooks: bool) -> MainConf | None:
    conf_file, prefix = resolve_paths(opts.conf, opts.prefix)
    loader = load_and_check if check_hooks else load
    try:
        conf = loader(conf_file, prefix, opts.globals_)
    except ConfigError as e:
        say(str(e))
        return None
    for warning in conf.warnings:
        say(warning)
    return conf


def _send_signal(opts: Options) -> int:
    # nginx reads the config for the pid path. A reload also tests the new config here, hooks
    # included, so a broken one is reported on the terminal with exit status 1 and the master
    # is never asked (nginx would signal and leave the reason in the error log only).
    reload = opts.signal == "reload"
    conf = _load_for_run(opts, check_hooks=reload)
    if conf is None:
        if reload:
            say(f"configuration file {resolve_paths(opts.conf, opts.prefix)[0]} test failed")
        return 1
    master = _import("scriptlb.process.master")
    if master is None:
        return 1
    assert opts.signal is not None
    return int(master.send_signal(conf, opts.signal))


def _run(opts: Options) -> int:
    conf = _load_for_run(opts, check_hooks=True)
    if conf is None:
        return 1
    master = _import("scriptlb.process.master")
    if master is None:
        return 1
    return int(master.run(conf, opts.globals_))


def _demo_paths(opts: Options) -> None:
    """--demo: the packaged default config, with logs and zones in a fresh temporary prefix
    (the installed package's directory may not be writable)."""
    import tempfile

    from scriptlb.config import DEFAULT_CONF, package_prefix

    opts.conf = os.path.join(package_prefix(), DEFAULT_CONF)
    opts.prefix = opts.prefix or tempfile.mkdtemp(prefix="scriptlb-demo-")
    say(f"demo: {opts.conf} with prefix {opts.prefix}; try: curl http://127.0.0.1:8080/")


def _hook_tool(argv: list[str]) -> int:
    return _tool("scriptlb.testing.hooktool", argv)


def _tool(module: str, argv: list[str]) -> int:
    """A subcommand: its module's ``main(argv)``."""
    tool = _import(module)
    if tool is None:
        return 1
    return int(tool.main(argv))


def _import(module: str) -> ModuleType | None:
    """Import a sibling module lazily, so -t/-v work while it is missing or broken."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        say(f"[emerg] {module} is not available in this build")
        return None
