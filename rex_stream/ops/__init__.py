"""Operating the worker: Prometheus metrics, health state and HTTP endpoints, the stats-log report.

* :mod:`rex_stream.ops.metrics` — :class:`WorkerMetrics`, the ``rex_stream_*`` Prometheus series.
* :mod:`rex_stream.ops.health` — :class:`HealthState`, the heartbeat file, :func:`serve`
  (``/metrics``, ``/healthz``, ``/readyz``) and ``rex-stream health``.
* :mod:`rex_stream.ops.stats_report` — ``rex-stream stats LOGFILE``: table and PNG from the JSON log.

The submodules are imported lazily so that ``rex-stream health`` stays fast and
``matplotlib`` is only needed by ``rex-stream stats``.
"""
