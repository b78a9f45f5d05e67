"""Deployment operators: turn a subject model into runnable, verified variants with their accuracy.

``data`` (datasets and splits), ``nets`` (torch networks), ``subjects`` (the default subject models and
how they are trained), ``onnxgraph`` (cuts and graph surgery), ``blackbox`` (operators on any ONNX
classifier: identity, partition, sptq, dynq, early-exit), ``whitebox`` (torch operators: qat, prune,
distill), ``evaluate`` (offline accuracy with 95 % CIs), ``build`` (the incremental build of every
default variant) and ``python -m operators`` (build, list, byo).
"""
