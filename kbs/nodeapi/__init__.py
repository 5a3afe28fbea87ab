"""The node-facing gRPC API (``NodeService`` in ``keylease.proto``) and what runs beside it.

``service`` turns protobuf into typed values for the protocol steps and their errors into status
codes (``kbs.status``; which errors are a verdict: ``status``); ``admission`` (with
``ratelimit``) bounds what any peer can make the broker do; ``changefeed`` pushes operator
changes to Watch streams; ``health`` reports the database on grpc.health.v1; ``metrics`` serves
Prometheus counters. ``kbs.server`` starts them.
"""
