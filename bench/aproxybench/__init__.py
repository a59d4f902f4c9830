"""
aproxy's benchmark as a package: C{bench/run.py} is its command line.

  - L{settings}: the modes (full, C{--quick}, C{--smoke}), sizes and shared constants;
  - L{procs}: child processes in their own process groups, and CPU/RSS from C{/proc};
  - L{httpio}: the small HTTP clients (probe, tunnel, upload) and L{httpio.Target};
  - L{targets}: how each target (direct, aproxy builds, squid, tinyproxy, proxy.py) is
    configured and started, and which targets a command line selects;
  - L{loads}: the scenarios (wrk or the Python load client, downloads, uploads, idle
    connections, slow reader);
  - L{harness}: L{harness.Harness}, what one run holds (temp dir, origin, upload sink,
    proxies started per phase, results and problems);
  - L{runner}: L{runner.Bench}, which runs every scenario per target and the alternating
    rounds;
  - L{profiling}: the optional py-spy profile;
  - L{report}: the Markdown report;
  - L{cli}: the options and C{main}.

The programs run as separate processes (the fallback origin, the upload sink, wrk's script)
are in C{bench/programs/}, the peers' and nginx's configs in C{bench/templates/}.
"""
