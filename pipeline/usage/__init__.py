"""Real-time usage read model (issue 17 part A, seed 001): usage and cost so far per (account, metric,
billing period), daily series, TOU bands, projections to period end, budget alerts.

Run with ``pipeline run usage``. It is a stage on the project's one runtime (``pipeline.runtime.loop``), not a
faust-streaming app: one runtime means one exactly-once model (Kafka transactions v2: state changelog, alerts
and input offsets commit together), state restore on assignment is already solved and tested there, and
there is one set of metrics, health checks and shutdown rules to operate.

Modules: ``projection`` (pure projections), ``model`` (pure state folding, snapshot, crossing rule),
``processor`` (the stage), ``store`` (Postgres SQL: snapshots, budgets), ``query`` (``snapshot()``),
``cli`` (``pipeline usage show|budget``).
"""
