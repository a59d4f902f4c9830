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
from aproxy.config import (
    DEFAULT_PORT,
    ProxyConfig,
    check_proxy_protocol,
    listen_description,
    parse_port_list,
)
from aproxy.observe.accesslog import AccessLogError
from aproxy.run.configfile import ConfigFileError, load_config_file
from aproxy.run.service import _ProxyService, adopted_service, restart_settings
from aproxy.run.service import makeService as _makeService
from aproxy.run.workers import WorkerPool, worker_count
from aproxy.upstream.tls import ClientTLS

__all__ = ["Options", "freeze_startup_heap", "makeService"]

_log = Logger()


class Options(usage.Options):
    """The command line of C{twistd aproxy}; every option is a L{ProxyConfig} field."""

    synopsis = "[options]"
    longdesc = (
        "aproxy: an HTTP/1.1 forward proxy. Point clients at it with, e.g., "
        "curl -x http://127.0.0.1:8080 http://example.com/. It listens on loopback only "
        "unless told otherwise with --port."
    )
    optFlags = [
        ["no-via", None, "Do not add a Via field to forwarded messages."],
        [
            "block-private",
            None,
            "Refuse destinations that resolve to loopback, private, link-local (cloud "
            "metadata), CGNAT, unique-local, multicast or unspecified addresses.",
        ],
    ]
    optParameters: list[list[Any]] = [
        [
            "config",
            None,
            None,
            "A TOML file whose keys are these long option names (e.g. connect-ports = "
            '[443, 8443], allow = ["10.0.0.0/8"]); options given here override it, and a '
            "repeatable option given here replaces the file's list. SIGHUP re-reads it.",
        ],
        ["connect-timeout", None, 10.0, "Seconds to connect to an origin before 504."],
        [
            "read-timeout",
            None,
            60.0,
            "Seconds to wait for the origin's response head, and between body bytes.",
        ],
        ["idle-timeout", None, 60.0, "Seconds an idle keep-alive client is kept."],
        [
            "header-timeout",
            None,
            10.0,
            "Seconds a client has to send a complete request head (then 408).",
        ],
        ["via", None, "aproxy", "Pseudonym used in the Via fields the proxy adds."],
        ["max-head-size", None, 65536, "Largest request or response head, bytes (431)."],
        ["max-request-line", None, 16384, "Longest request line, bytes (414)."],
        ["pool-size", None, 100, "Idle upstream connections kept per origin (0: none)."],
        [
            "pool-idle-timeout",
            None,
            30.0,
            "Seconds an idle pooled upstream connection is kept.",
        ],
        [
            "pool-max-age",
            None,
            120.0,
            "Seconds after which a pooled upstream connection is no longer reused, however "
            "busy (a new one is made, and its address checked again).",
        ],
        [
            "connect-ports",
            None,
            "443",
            "Ports CONNECT may reach: comma-separated ports and ranges (8000-8100), or * for any.",
        ],
        [
            "http-ports",
            None,
            "80,443,1025-65535",
            "Ports plain http://, https://, ws:// and wss:// requests may reach (not CONNECT): "
            "comma-separated ports and ranges, or * for any.",
        ],
        [
            "tunnel-idle-timeout",
            None,
            600.0,
            "Seconds a CONNECT or Upgrade tunnel may stay silent before it is closed.",
        ],
        [
            "x-forwarded-for",
            None,
            "keep",
            "add (append the client address), strip (remove incoming ones) or keep.",
        ],
        ["max-connections", None, 4096, "Client connections served at once; more get 503."],
        [
            "auth",
            None,
            None,
            "An Apache htpasswd file (bcrypt, $apr1$, {SHA}, $5$, $6$ entries): every "
            "request then needs Proxy-Authorization: Basic credentials, or gets 407. "
            "Re-read when it changes.",
        ],
        ["auth-realm", None, "aproxy", "The realm named in the 407 challenge."],
        [
            "upstream",
            None,
            None,
            "Send everything through a parent proxy: http://[user:pass@]host:port, "
            "https://... (TLS to the parent) or socks5://[user:pass@]host:port (names "
            "resolved by the parent). The same as a last --route '*=URL'.",
        ],
        [
            "ca-file",
            None,
            None,
            "A PEM file of certificate authorities to trust for https:// origins and "
            "https:// parents, in addition to the system's trust store.",
        ],
        [
            "access-log",
            None,
            None,
            "Write one line per request and tunnel to this file (- for standard output); "
            "SIGUSR1 reopens it after rotation.",
        ],
        [
            "access-log-format",
            None,
            "combined",
            "combined (Apache style plus extras), squid (Squid's access.log) or json.",
        ],
        [
            "metrics",
            None,
            None,
            "Serve /metrics (Prometheus) and /status (a page) on this endpoint, e.g. "
            "tcp:9108:interface=127.0.0.1 (a bare number means that port on 127.0.0.1). "
            "With --workers, the parent serves the totals over all workers.",
        ],
        [
            "workers",
            None,
            "1",
            "Worker processes sharing the listening ports (auto: one per core). Each is a "
            "whole proxy; the parent restarts one that dies, passes signals on and serves "
            "--metrics with the workers' totals.",
        ],
        [
            "shutdown-timeout",
            None,
            30.0,
            "On stop (SIGTERM): seconds requests and tunnels in flight may take to finish; "
            "idle connections close at once.",
        ],
        [
            "max-clients-per-ip",
            None,
            256,
            "Client connections from one address at once; more get 503.",
        ],
        [
            "auth-max-failures",
            None,
            10,
            "With --auth: failed logins one client address may make within "
            "--auth-failure-window; then 429 until that window closes, with no password "
            "checked (0: no limit).",
        ],
        [
            "auth-failure-window",
            None,
            60.0,
            "Seconds from an address's first failed login during which its failures count.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["port"] = []
        self["allow"] = []
        self["proxy-protocol-from"] = []
        self["deny-host"] = []
        self["allow-host"] = []
        self["route"] = []
        self["insecure-host"] = []
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
        the option (and the file for a file's value). Run by twistd, that line goes to
        standard error with "see --help" and the exit status is 2, instead of twistd's
        whole usage text and status 1; otherwise (a reload, an embedder) it is raised.

        @raise usage.UsageError: For a bad option or value (not run by twistd).
        @raise ConfigFileError: For a config file that can't be read or has a syntax
            or type error (not run by twistd).
        """
        self.argv = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except (usage.UsageError, ConfigFileError) as e:
            message = self._name_source(str(e))
            exits = self.exit_on_config_error
            if exits is None:
                # twistd parses its subcommand's options with .parent set to its own.
                exits = getattr(self, "parent", None) is not None
            if not exits:
                raise type(e)(message) from None
            if message.startswith(tuple(OPTION_KINDS)) and not self._from_file(message):
                # A command-line value: name the option as it is written there.
                message = "--" + message
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

    def opt_allow(self, cidr: str) -> None:
        """
        A client network (address or CIDR) that may use the proxy (repeatable). Default:
        127.0.0.0/8 and ::1/128 only; other clients get 403.
        """
        self["allow"].append(cidr)

    def opt_proxy_protocol_from(self, cidr: str) -> None:
        """
        A load balancer network (address or CIDR) trusted to send a PROXY header
        (repeatable; required with a --port haproxy:tcp:... listener, where any other
        peer, and a trusted one's connection without a header, is closed).
        """
        self["proxy-protocol-from"].append(cidr)

    def opt_deny_host(self, pattern: str) -> None:
        """
        A destination to refuse (repeatable): a host name, *.example.com (subdomains),
        .example.com (the domain and its subdomains), or an IP address or CIDR.
        """
        self["deny-host"].append(pattern)

    def opt_allow_host(self, pattern: str) -> None:
        """
        A destination to allow (repeatable; same patterns as --deny-host). With any
        --allow-host, only matching destinations are allowed.
        """
        self["allow-host"].append(pattern)

    def opt_route(self, rule: str) -> None:
        """
        PATTERN=TARGET (repeatable, first match wins): send requests for hosts matching
        PATTERN (a host name, *.suffix or *) to TARGET, a parent proxy URL as for
        --upstream or direct. E.g. --route '*.corp.example=http://10.1.2.3:3128'
        --route '*=direct'. Hosts no route matches go directly (or to --upstream).
        """
        self["route"].append(rule)

    def opt_insecure_host(self, host: str) -> None:
        """
        Do not verify the TLS certificate of this origin or parent host (repeatable;
        there is no switch for all hosts). A warning is logged at start.
        """
        self["insecure-host"].append(host)

    def opt_port(self, description: str) -> None:
        """
        Where to listen (repeatable): a bare port number means that port on 127.0.0.1;
        or any Twisted endpoint, e.g. tcp:8080:interface=0.0.0.0, tcp6:8080:interface=\\:\\:1,
        unix:/run/aproxy.sock. Default: tcp:8080:interface=127.0.0.1.
        """
        try:
            self["port"].append(listen_description(description))
        except ValueError as e:
            raise usage.UsageError(f"--port: {e}") from None

    opt_p = opt_port

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
                if key == "port":
                    try:
                        value = [listen_description(v) for v in value]
                    except ValueError as e:
                        raise usage.UsageError(f"{self['config']}: port: {e}") from None
                self[key] = value
        ports = tuple(self["port"]) or (DEFAULT_PORT,)
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
            self["proxy-config"] = ProxyConfig(
                port=ports,
                connect_timeout=_number(self, "connect-timeout", float),
                read_timeout=_number(self, "read-timeout", float),
                idle_timeout=_number(self, "idle-timeout", float),
                header_timeout=_number(self, "header-timeout", float),
                via=None if self["no-via"] else self["via"],
                max_head_size=_number(self, "max-head-size", int),
                max_request_line=_number(self, "max-request-line", int),
                pool_size=_number(self, "pool-size", int),
                pool_idle_timeout=_number(self, "pool-idle-timeout", float),
                pool_max_age=_number(self, "pool-max-age", float),
                connect_ports=parse_port_list(self["connect-ports"]),
                http_ports=parse_port_list(self["http-ports"], "http-ports"),
                tunnel_idle_timeout=_number(self, "tunnel-idle-timeout", float),
                allow=tuple(self["allow"]) or ProxyConfig.allow,
                proxy_protocol_from=tuple(self["proxy-protocol-from"]),
                deny_host=tuple(self["deny-host"]),
                allow_host=tuple(self["allow-host"]),
                block_private=bool(self["block-private"]),
                x_forwarded_for=self["x-forwarded-for"],
                max_connections=_number(self, "max-connections", int),
                max_clients_per_ip=_number(self, "max-clients-per-ip", int),
                auth=self["auth"],
                auth_realm=self["auth-realm"],
                auth_max_failures=_number(self, "auth-max-failures", int),
                auth_failure_window=_number(self, "auth-failure-window", float),
                shutdown_timeout=_number(self, "shutdown-timeout", float),
                access_log=self["access-log"],
                access_log_format=self["access-log-format"],
                metrics=self["metrics"],
                route=tuple(self["route"]),
                upstream=self["upstream"],
                ca_file=self["ca-file"],
                insecure_host=tuple(self["insecure-host"]),
            )
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


# twistd's --help shows an opt_* docstring as written, indentation included: fold each into
# one line of text.
for _name in dir(Options):
    if _name.startswith("opt_"):
        _method = getattr(Options, _name)
        if _method.__doc__:
            _method.__doc__ = " ".join(_method.__doc__.split())

# The kind of value each long option takes, for the config file (see configfile.py).
OPTION_KINDS: dict[str, str] = {
    "port": "list",
    "allow": "list",
    "proxy-protocol-from": "list",
    "deny-host": "list",
    "allow-host": "list",
    "no-via": "flag",
    "block-private": "flag",
    "connect-timeout": "float",
    "read-timeout": "float",
    "idle-timeout": "float",
    "header-timeout": "float",
    "via": "str",
    "max-head-size": "int",
    "max-request-line": "int",
    "pool-size": "int",
    "pool-idle-timeout": "float",
    "pool-max-age": "float",
    "connect-ports": "ports",
    "http-ports": "ports",
    "tunnel-idle-timeout": "float",
    "x-forwarded-for": "str",
    "max-connections": "int",
    "max-clients-per-ip": "int",
    "auth": "str",
    "auth-realm": "str",
    "auth-max-failures": "int",
    "auth-failure-window": "float",
    "shutdown-timeout": "float",
    "workers": "workers",
    "access-log": "str",
    "access-log-format": "str",
    "metrics": "str",
    "route": "list",
    "upstream": "str",
    "ca-file": "str",
    "insecure-host": "list",
}


def _number(options: Options, name: str, kind: type[int] | type[float]) -> Any:
    value = options[name]
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"--{name} must be {what}, not {value!r}") from None


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
        inner = cast(_ProxyService, self._inner)
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
