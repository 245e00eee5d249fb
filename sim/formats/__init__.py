"""Readers of the published prefix-trace formats: each maps its file into the request stream
of :mod:`kvtrie.sim.traces`, with errors naming the file, the line or request, and the field."""
