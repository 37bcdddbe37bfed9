"""Speed and memory benchmarks (not part of the installed library).

Run them from the repository root as modules, e.g.
``.venv/bin/python -m benchmarks.train_step``; see docs/performance.md.
"""
