"""A LiveMap shared across processes over Redis (the implementation of
:mod:`livemap.redis`)."""
