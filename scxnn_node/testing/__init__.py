"""Support for the tests and the benchmarks, installed with the node (like numpy.testing).

Each module imports at most the node's core (never training/, never tests/), so tests/ and
bench/ import it without touching sys.path. This file imports nothing, so a module here that
keeps away from the node's internals stays that way.
"""
