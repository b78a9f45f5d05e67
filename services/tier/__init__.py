"""One tier's service: load its submodels, serve V2 infer, run its stages, forward, export metrics.

``settings`` (what a tier is told), ``limits`` (the cgroup limits it runs under), ``runtime`` (onnxruntime
sessions), ``links`` (link shaping: tc command builders, backend detection, the userspace fallback),
``forwarder`` (the client to the next tier), ``dataplane`` (the pipeline logic, no HTTP), ``telemetry``
(Prometheus metrics) and ``app`` (the FastAPI adapter). ``services.__main__`` starts it.
"""
