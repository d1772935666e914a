"""Plumbing every other part may use: errors (UserError, the one-line errors), files (atomic
writes, the primary process), registry (named registries and config.imports), console and
logs (what the user sees, metrics files), sharding and distributed (the device mesh, many
hosts) and runlock (one training per run directory). Imports nothing else of flmiseg.
"""
