"""Everything two parts of tierlab must agree on, and nothing else.

This package imports no other tierlab package: ``operators``, ``services.tier`` and ``loadgen`` depend
on it and never on each other. Modules: ``manifest`` (variants and their stages), ``specs`` (tiers,
links, placements, deployments), ``codec`` (the V2 wire format), ``pipeline`` (pipeline control and hop
timings in V2 parameters), ``errors`` (the error tree), ``metrics`` (metric names and labels),
``dtypes`` (V2 ↔ numpy ↔ ONNX datatypes), ``variant`` (writing stage files and their manifest).
"""
