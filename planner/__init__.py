"""planner: per-unit activation memory (symbolic on meta, or measured) and checkpoint plans.

Scope (issue 4): a profiler, a per-rank memory model, the paper's min-max segmentation and a
recompute-minimising solver, all returning frozen JSON-serialisable plans. Not yet implemented:
this package currently exports nothing.
"""

__all__: list[str] = []
