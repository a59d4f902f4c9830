#!/usr/bin/env python3
"""
aproxy's own benchmark: aproxy side by side with a direct connection to the same origin,
and with squid, tinyproxy and proxy.py when they are installed.

Starts a local origin on 127.0.0.1 (nginx from a config rendered into a temp dir when nginx
is installed, else a small asyncio origin written into that temp dir) serving C{/100b} and a
large file, then each proxy target in turn (C{--targets}: aproxy, aproxy with C{--workers 2},
squid, tinyproxy, proxy.py; configs rendered into the temp dir) on a free loopback port,
afresh for each phase, and measures through each:

  - requests/s and p50/p99 latency for 100-byte keep-alive responses (wrk, 1 thread,
    50 connections, absolute-form targets through the proxy; a Python load client when wrk
    is missing), and proxy CPU seconds per 10k requests (/proc/PID/stat);
  - the same with C{Connection: close} on every request;
  - the keep-alive and Connection: close loads again in a few rounds with every target
    running, taking the targets in turn, and per target the medians of its rounds: on a
    shared machine these are the figures to compare targets by, since a slow spell hits
    all of them alike;
  - MB/s for a 100 MiB plain forwarded download (curl -x, median of 3), the same through a
    CONNECT tunnel (curl -p -x; aproxy runs with --connect-ports set to the origin's port),
    and a 100 MiB plain forwarded upload (POST body, curl --data-binary) to a small Python
    sink that reads the whole body before it answers;
  - RSS per idle keep-alive connection with 1000 of them held;
  - RSS growth while a slow client (64 KiB receive buffer, ~1 MB/s) reads the 100 MiB body.

Prints one Markdown report on standard output, a table with a row per target (progress goes
to standard error). Only the Python 3.11 standard library is used; wrk, nginx and curl are
used when present. Every child process runs in its own process group and is killed at the
end, also on Ctrl-C or errors. A peer's failure is reported but does not fail the run.
With C{--aproxy-b-checkout DIR} (or C{--aproxy-cmd-b CMD}) a second aproxy build runs as
target aproxy-b in the same rounds, and the report compares the two builds' medians.

This file is the entry point only: the code is the package C{bench/aproxybench/}, the
programs it runs as separate processes are in C{bench/programs/}, and the configs it renders
in C{bench/templates/}.

Usage: python bench/run.py [--quick] [--smoke] [--targets A,B,...] [--aproxy-cmd CMD]
       [--aproxy-b-checkout DIR] [--aproxy-cmd-b CMD] ...
"""

from __future__ import annotations

import sys

from aproxybench.cli import main

if __name__ == "__main__":
    sys.exit(main())
