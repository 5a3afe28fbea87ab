"""Operators: their actions, run locally or over the admin API.

``actions`` carries out each change on the store with its audit record; ``operator`` is the
interface every operator command calls (``LocalOperator`` on a database, ``client.RemoteOperator``
over the admin API); ``service`` is the admin API inside the broker (mutual TLS; status codes by
``kbs.status``) and ``wire`` its message conversions; ``certs`` issues, revokes and
checks admin client certificates; ``keyimport`` parses an operator's image private key.
"""
