"""``python -m memscope_async.demo``: run the demo service without profiling."""

from . import run

run()
