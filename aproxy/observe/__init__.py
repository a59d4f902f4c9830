"""
What the proxy tells about itself: per-exchange records, access logs, Prometheus metrics,
the status page, and the totals over worker processes.
"""
