"""A bench step run in a fresh process: its peak memory is its own (a process's peak RSS only ever grows),
and it inherits no compiled graphs or loaded arrays from the steps before it."""

import concurrent.futures
import contextlib
import multiprocessing
import sys


def in_fresh_process(function, **kwargs):
    """function(**kwargs) in a new spawned process, its printed progress on stderr (the bench's own
    figures are the only stdout); its return value."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_quietly, function, kwargs).result()


def _quietly(function, kwargs: dict):
    with contextlib.redirect_stdout(sys.stderr):
        return function(**kwargs)
