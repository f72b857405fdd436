"""The daemon's parts, each with one job, put together by :mod:`proxy.service`:
the tree of services and systemd (:mod:`.tree`), the audit log's batches
(:mod:`.auditing`), readiness and the metrics read at scrape time
(:mod:`.health`), and the listeners with their reload and drain
(:mod:`.listeners`)."""
