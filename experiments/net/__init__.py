"""The network benchmark, ``python -m experiments.net``: measured speedups over
tc-shaped links between network namespaces, against the time model.

Modules: ``__main__`` (the command line), ``bench`` (the launches of each
link setting), ``worker`` (one training process and its step clock), ``ns``
(namespaces, veth links, bridge and tc shaping) and ``model`` (the
measurements against the time model and the gloo-aware model).
"""
