"""llmsim: a discrete-event capacity-planning simulator for LLM application stacks.

    import sim
    result = sim.run("workloads/chat-selfhosted.yaml", replications=5)
    result.summary          # flat dict of metrics (with 95% intervals)
    result.requests         # one row per request (pandas DataFrame)
"""
from typing import Any

__version__ = "0.1.0"
__all__ = ["run", "sweep", "plan", "compare", "load_workload", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import sim` (and the CLI's start-up) does not pay for pandas and SimPy.
    if name == "run":
        from sim.experiments.run import run

        return run
    if name == "sweep":
        from sim.experiments.sweep import sweep

        return sweep
    if name == "plan":
        from sim.experiments.plan.planner import make_plan

        return make_plan
    if name == "compare":
        from sim.experiments.compare import compare

        return compare
    if name == "load_workload":
        from sim.config.loader import load_workload

        return load_workload
    raise AttributeError(f"module 'sim' has no attribute {name!r}")
