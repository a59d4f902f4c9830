"""
twistd glue: the C{aproxy} command line (L{Options}) and L{makeService}, which turns the
parsed options into a L{ProxyConfig} and the service from L{aproxy.run.service}.
"""

from __future__ import annotations

import gc
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python import usage

from aproxy.access.auth import HtpasswdAuthenticator
from aproxy.addons.load import AddonLoadError, check_spec
from aproxy.config import ProxyConfig, check_proxy_protocol, listen_description
from aproxy.intercept.ca import CAError, default_ca_dir, load_or_create
from aproxy.observe.accesslog import AccessLogError
from aproxy.options import OPTIONS, Option, option, toml_kinds
from aproxy.run.configfile import ConfigFileError, load_config_file
from aproxy.run.service import ProxyService, adopted_service, restart_settings
from aproxy.run.service import makeService as _makeService
from aproxy.run.workers import WorkerPool, worker_count
from aproxy.upstream.tls import ClientTLS

__all__ = ["Options", "freeze_startup_heap", "makeService"]

_log = Logger()


class Options(usage.Options):
    """
    The command line of C{twistd aproxy}, made from the table L{aproxy.options.OPTIONS}:
    every option there is one here, with its help text, and becomes the L{ProxyConfig}
    field of the same name.
    """

    synopsis = "[options]"
    longdesc = (
        "aproxy: an HTTP/1.1 forward proxy. Point clients at it with, e.g., "
        "curl -x http://127.0.0.1:8080 http://example.com/. It listens on loopback only "
        "unless told otherwise with --port."
    )
    optFlags: list[list[Any]] = [[o.name, o.short, o.help] for o in OPTIONS if o.flag]
    optParameters: list[list[Any]] = [
        [o.name, o.short, o.command_line_default, o.help]
        for o in OPTIONS
        if not o.flag and not o.repeatable
    ]

    def __init__(self) -> None:
        super().__init__()
        for row in OPTIONS:
            if row.repeatable:
                self[row.name] = []
        self.argv: list[str] = []
        # On a bad setting: print one line and exit 2 (True), raise (False, for reload),
        # or exit only when run by twistd, which would print the whole usage (None).
        self.exit_on_config_error: bool | None = None
        # Which options the command line gave, so that they override the config file.
        self.given: set[str] = set()
        # Which options took their value from the config file, to name it in errors.
        self.from_file: set[str] = set()
        for name, handler in list(self._dispatch.items()):
            self._dispatch[name] = self._recording(name, handler)

    def _recording(self, name: str, handler: Any) -> Callable[[str, str], None]:
        key = name.replace("_", "-")

        def record(option: str, value: str) -> None:
            self.given.add(key)
            if isinstance(handler, usage.CoerceParameter):
                handler.dispatch(option, value)
            else:
                handler(option, value)

        return record

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse, remembering the arguments so that SIGHUP can parse them again.

        Every bad setting, from the command line or the config file, is one line naming
        the option (C{--name} for a command-line value, the file and key for a file's
        value). Run by twistd, that line goes to standard error with "see --help" and the
        exit status is 2, instead of twistd's whole usage text and status 1; otherwise (a
        reload, an embedder) it is raised.

        @raise usage.UsageError: For a bad option or value (not run by twistd).
        @raise ConfigFileError: For a config file that can't be read or has a syntax
            or type error (not run by twistd).
        """
        self.argv = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except (usage.UsageError, ConfigFileError) as e:
            message = self._name_source(str(e))
            if message.startswith(tuple(OPTION_KINDS)) and not self._from_file(message):
                # A command-line value: name the option as it is written there.
                message = "--" + message
            exits = self.exit_on_config_error
            if exits is None:
                # twistd parses its subcommand's options with .parent set to its own.
                exits = getattr(self, "parent", None) is not None
            if not exits:
                raise type(e)(message) from None
            sys.stderr.write(f"aproxy: {message} (see --help)\n")
            sys.stderr.flush()
            raise SystemExit(2) from None

    def _from_file(self, message: str) -> bool:
        """Whether C{message} already starts with the config file's path."""
        path = self["config"]
        return path is not None and message.startswith(f"{path}: ")

    def _name_source(self, message: str) -> str:
        """Put the config file's path before an error about a value that came from it."""
        if self["config"] is None or self._from_file(message):
            return message
        name = message.lstrip("-").split(":")[0].split(" ")[0]
        if name in self.from_file:
            return f"{self['config']}: {message.lstrip('-')}"
        return message

    def opt_version(self) -> None:
        """Print aproxy's, Twisted's and Python's versions and exit."""
        import platform

        from aproxy.version import VERSION
        from twisted import __version__ as twisted_version

        sys.stdout.write(
            f"aproxy {VERSION}\nTwisted {twisted_version}\nPython {platform.python_version()}\n"
        )
        sys.stdout.flush()
        raise SystemExit(0)

    def postOptions(self) -> None:
        """Build the validated L{ProxyConfig}; a bad value is one usage error line."""
        if self["config"] is not None:
            values = load_config_file(self["config"], OPTION_KINDS)
            for key, value in values.items():
                if key in self.given:
                    continue
                self.from_file.add(key)
                self[key] = value
        fields = self._fields()
        try:
            ports = option("port").parse(fields.get("port", option("port").default))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        try:
            socks_ports = option("socks-port").parse(fields.get("socks_port", ()))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        for description in socks_ports:
            try:
                serverFromString(None, description)
            except Exception as e:
                raise usage.UsageError(f"--socks-port {description}: {e}") from None
        for description in ports:
            if description.startswith("systemd:"):
                # Parsed once, when listening: it takes over the inherited descriptors.
                continue
            try:
                # Parsing builds the endpoint object without listening; for ssl: it also
                # loads the key and certificate, so a bad file is reported here.
                serverFromString(None, description)
            except Exception as e:
                raise usage.UsageError(f"--port {description}: {e}") from None
        if self["metrics"] is not None:
            try:
                serverFromString(None, listen_description(self["metrics"]))
            except Exception as e:
                raise usage.UsageError(f"--metrics {self['metrics']}: {e}") from None
        try:
            check_proxy_protocol(ports, self["proxy-protocol-from"])
        except ValueError as e:
            if not self.exit_on_config_error:
                raise usage.UsageError(str(e)) from None
            sys.stderr.write(f"aproxy: {e}\n")
            raise SystemExit(2) from None
        try:
            self["worker-count"] = worker_count(str(self["workers"]))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        try:
            self["proxy-config"] = ProxyConfig(**fields)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["auth"] is not None:
            try:
                # Load it now so that a bad file is one line at start, not a traceback.
                HtpasswdAuthenticator(self["auth"], self["auth-realm"], clock=Clock())
            except ValueError as e:
                raise usage.UsageError(f"--auth {e}") from None
        try:
            ClientTLS(self["ca-file"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        config = self["proxy-config"]
        if config.intercept:
            try:
                # Made (or checked) here, in the parent, before any worker starts.
                load_or_create(config.ca_dir or default_ca_dir())
            except CAError as e:
                raise usage.UsageError(f"--ca-dir: {e}") from None
        for spec in config.addon:
            try:
                # Imported here, in the parent, before any worker starts (each worker
                # makes its own addon objects).
                check_spec(spec)
            except AddonLoadError as e:
                raise usage.UsageError(str(e)) from None

    def _fields(self) -> dict[str, Any]:
        """
        The L{ProxyConfig} fields the parsed options give, as given (text from the
        command line, TOML values from the file): a repeatable option not given is left
        out (its default applies), a negating flag (C{--no-via}) sets its field to
        L{None}.
        """
        fields: dict[str, Any] = {}
        for row in OPTIONS:
            value = self[row.name]
            if row.negates is not None:
                if value:
                    fields[row.negates] = None
            elif row.field is None or (row.repeatable and not value):
                continue
            elif row.flag:
                fields[row.field] = bool(value)
            elif row.field not in fields:
                fields[row.field] = value
        return fields


def _repeatable(row: Option) -> Callable[[Options, str], None]:
    """The C{opt_*} handler of a repeatable option: each value is added to its list."""

    def handler(self: Options, value: str) -> None:
        self[row.name].append(value)

    handler.__name__ = "opt_" + row.name.replace("-", "_")
    handler.__doc__ = row.help
    return handler


for _row in OPTIONS:
    if _row.repeatable:
        _handler = _repeatable(_row)
        setattr(Options, _handler.__name__, _handler)
        if _row.short is not None:
            # The same function object: usage.Options shows it as -p, --port.
            setattr(Options, "opt_" + _row.short, _handler)

# The kind of value each long option takes, for the config file (see configfile.py).
OPTION_KINDS: dict[str, str] = toml_kinds()


class _CommandLineService(MultiService):
    """
    The service twistd runs: a failure to listen ends the start with one line on
    standard error and exit status 1, instead of twistd's long traceback.
    """

    log = Logger()

    def __init__(
        self,
        inner: IService,
        exit: Callable[[str], None],
        options: Options | None = None,
        worker: bool = False,
    ) -> None:
        super().__init__()
        inner.setServiceParent(self)
        self._inner = inner
        self._exit = exit
        self._options = options
        self._worker = worker

    def startService(self) -> None:
        """Start, re-read the configuration on SIGHUP, and freeze the start-up heap."""
        super().startService()
        from twisted.internet import reactor

        reactor.callWhenRunning(freeze_startup_heap)
        if self._options is not None and hasattr(signal, "SIGHUP"):
            threads = cast(Any, reactor)
            signal.signal(signal.SIGHUP, lambda signum, frame: threads.callFromThread(self.reload))
            signal.signal(
                signal.SIGUSR1, lambda signum, frame: threads.callFromThread(self.reopen_logs)
            )

    def reopen_logs(self) -> None:
        """Reopen the access log (SIGUSR1, after logrotate moved it)."""
        if isinstance(self._inner, WorkerPool):
            self._inner.signal_workers(signal.SIGUSR1)
            return
        access_log = getattr(self._inner, "access_log", None)
        if access_log is not None:
            access_log.reopen()
            self.log.info("access log reopened")

    def reload(self) -> None:
        """
        Parse the original command line (and so the config file, the auth file and the
        access rules) again and apply it to new requests; connections are not dropped and
        the listening ports do not change. A configuration that fails validation is
        logged and the running one kept.
        """
        assert self._options is not None
        fresh = Options()
        fresh.exit_on_config_error = False
        try:
            fresh.parseOptions(self._options.argv)
        except (usage.UsageError, ValueError) as e:
            self.log.warn("reload failed, keeping the running configuration: {why}", why=e)
            if isinstance(self._inner, WorkerPool):
                self._inner.signal_workers(signal.SIGHUP)
            return
        config = fresh["proxy-config"]
        if isinstance(self._inner, WorkerPool):
            # The workers reload themselves; the parent keeps its sockets and metrics
            # endpoint and only takes the rest (the limits it applies, /status's table).
            self._warn_restart(self._inner.config, fresh)
            self._inner.reconfigure(config)
            self._inner.signal_workers(signal.SIGHUP)
            return
        inner = cast(ProxyService, self._inner)
        running = inner.factory.config
        try:
            inner.reconfigure(config)
        except ValueError as e:
            self.log.warn("reload failed, keeping the running configuration: {why}", why=e)
            return
        if not self._worker:
            # (A worker's parent says it once for all.)
            self._warn_restart(running, fresh)
        self.log.info("configuration reloaded")

    def _warn_restart(self, running: ProxyConfig, fresh: Options) -> None:
        """Log, in one line, each changed setting that a reload can't apply."""
        assert self._options is not None
        names = restart_settings(running, fresh["proxy-config"])
        if fresh["worker-count"] != self._options["worker-count"]:
            names.append("workers")
        if names:
            self.log.warn(
                "changed settings that need a restart, kept as they run: {names}",
                names=", ".join(names),
            )

    def privilegedStartService(self) -> None:
        """Bind the ports, reporting one that can't be bound in a single line."""
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            self._exit(f"aproxy: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}")
        except (OSError, ValueError) as e:
            self._exit(f"aproxy: cannot listen: {e}")

    def stopService(self) -> Any:
        """
        Stop gracefully. A SIGTERM is the normal way to stop a service here, so once the
        connections in flight are done twistd should exit with status 0 rather than
        re-raise the signal (which twistd does by default, giving status 143/-15).
        """
        from twisted.internet import reactor

        if getattr(reactor, "_exitSignal", None) == signal.SIGTERM:
            reactor._exitSignal = None  # type: ignore[attr-defined]
        return super().stopService()


def freeze_startup_heap() -> int:
    """
    Move every object that exists once the proxy is running (modules, classes, the
    configuration: a few hundred thousand objects) out of the garbage collector's sight.

    They live as long as the process, yet each full collection walks them all again. With
    a new connection per request, the cycles each connection leaves behind trigger a full
    collection every second or two, which took 40-50 ms here and set the 99th percentile
    latency (42 ms); with the start-up heap frozen a full collection takes a few ms and the
    99th percentile was 15 ms. (C{gc.freeze}, Python 3.7+, is made for long-lived
    servers.)

    @return: How many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    count = gc.get_freeze_count()
    _log.info("start-up heap frozen for the garbage collector: {count} objects", count=count)
    return count


def _exit(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    raise SystemExit(1)


def makeService(options: Options) -> IService:
    """Make the proxy service from parsed command-line options."""
    config = options["proxy-config"]
    if options["worker-count"] > 1:
        from twisted.internet import reactor

        argv = [a for a in options.argv]
        pool = WorkerPool(config, argv, options["worker-count"], reactor)
        return _CommandLineService(pool, _exit, options)
    try:
        inner = _makeService(config)
    except AccessLogError as e:
        # A bad setting like any other: one line, status 2 (see Options.parseOptions).
        sys.stderr.write(f"aproxy: --access-log: {e} (see --help)\n")
        raise SystemExit(2) from None
    except ValueError as e:
        _exit(f"aproxy: {e}")
        raise  # unreachable: _exit raises
    return _CommandLineService(inner, _exit, options)


def worker_service(
    argv: list[str],
    fds: list[tuple[int, int]],
    snapshot: str | None = None,
    own: Sequence[IAddress] = (),
) -> IService:
    """
    The service of one C{--workers} worker process: the same options as the parent,
    serving on the inherited sockets, reloading on SIGHUP and reopening logs on SIGUSR1.

    @param snapshot: With C{--metrics}: the unix socket where the worker serves its
        figures to the parent (which serves the metrics endpoint itself).
    @param own: The parent's addresses (its metrics endpoint), refused as loops.
    """
    options = Options()
    # A config file changed into a bad one before a worker restarts: one line, not a
    # traceback.
    options.exit_on_config_error = True
    options.parseOptions(argv)
    inner = adopted_service(options["proxy-config"], fds, snapshot=snapshot, own=own)
    return _CommandLineService(inner, _exit, options, worker=True)
