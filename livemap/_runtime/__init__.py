"""The component runtime (layer 2): the run context and handler chain, the
component tree, keyed targets, mounting, live components and apps.

It knows nothing of feeds or LiveMap: what it hosts (a target, a host of
children, something retired with a run) it knows only through the protocols
of :mod:`livemap._runtime._hosting`.
"""
