"""Feeds and their consumers (layer 3): the view, feed and subscriber
protocols and the consumer options; the worker pool of a ``mount_each``; the
per-entry children of a ``mount_each`` (its host in the runtime's tree); the
consumer of a map, which owns each key's consumer-side life.

``mount_each`` is the one bridge from here into the runtime.
"""
