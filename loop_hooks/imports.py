"""Run a function on a module as soon as it is imported, or at once if it already is.

The profiler wraps a few module-level loop makers (``uvloop.new_event_loop``) while it
runs.  A program often imports uvloop only after the profiler started (``memscope-async
run`` starts it before the program's first line), so the wrap has to wait for the import.
A finder placed first on ``sys.meta_path`` answers for that one module name only: it asks
the other finders for the module's spec, as the import system would, and hands back that
spec with its loader wrapped, so the module runs its own code as before and the function
is applied right after.  Every other import never sees it.  The approach is the one of
wrapt's post-import hooks and ddtrace's ModuleWatchdog, reduced to what we need.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["when_imported"]


class _Loader(importlib.abc.Loader):
    """The module's own loader, with ``then(module)`` after its code ran."""

    def __init__(self, loader: Any, then: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._then = then

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        made: ModuleType | None = self._loader.create_module(spec)
        return made

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        # (the module's __spec__.loader and __loader__ stay its own loader: put them back)
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        try:
            self._then(module)
        except Exception:  # never let our wrapping break the program's import
            pass

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.then = then
        self._busy = threading.local()

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        spec: importlib.machinery.ModuleSpec | None = None
        try:
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                # (another of ours, an earlier profiler's left in a forked child: skipped,
                # so loaders never nest and the module keeps its own)
                if not isinstance(finder, _Finder) and find is not None:
                    spec = find(fullname, path, target)
                    if spec is not None:
                        break
        finally:
            self._busy.on = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec  # (a namespace package or an old-style loader: left alone)
        spec.loader = _Loader(spec.loader, self._imported)
        return spec

    def _imported(self, module: ModuleType) -> None:
        self.stop()  # once is enough: a later import of it finds it in sys.modules
        self.then(module)

    def stop(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def when_imported(name: str, then: Callable[[ModuleType], None]) -> Callable[[], None]:
    """``then(module)`` now if the top-level module ``name`` is imported, else right after
    its first import from now on.  Returns the function that stops waiting (idempotent;
    it does not undo what ``then`` did)."""
    module = sys.modules.get(name)
    if module is not None:
        # (one another thread is importing right now is taken as it is: waiting for that
        # import here could deadlock a program whose importing thread waits for this one)
        then(module)
        return lambda: None
    finder = _Finder(name, then)
    sys.meta_path.insert(0, finder)
    return finder.stop
