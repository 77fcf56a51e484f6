"""The version of livemap (PEP 440).

Between releases this is the next release's version with a ``.dev0``
suffix; a release sets it to the plain version and is tagged ``v<version>``.
"""

__version__ = "0.2.0.dev0"
