"""The persistence layer: tables, dialect profiles, queries, engines and server routines.

Nothing here knows the Agents SDK or the public faces; the faces call down into it.
"""
