"""Runnable examples of livemap.

``python -m livemap.examples.entities`` indexes the entities of a JSONL event
stream into SQLite: producers replay the stream into a LiveMap, and one
consumer component per entity keeps a row for it (see
:mod:`livemap.examples.entities`).
"""
