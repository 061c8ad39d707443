"""Fault enumeration: record every call a path makes to Redis, the broker and the database, then
run the path again once per call and fault kind, and check the delivery invariants after each.

- ``inject/sitecustomize.py``: the interceptor, loaded only by the processes under test;
- ``lane.py``: a complete service of its own (Redis, PostgreSQL database, RabbitMQ vhost,
  gunicorn, worker, beat) that runs a path's runs one after another;
- ``paths.py``: the paths and their scenarios; ``checks.py``: settling and the invariants;
- ``engine.py``: recording, planning, lanes side by side, the table;
- ``run.py``: ``python -m tests.enumerate.run [paths...] [--out FILE] [--service-root DIR]``;
- ``test_enumerate.py``: the same under pytest (marker ``faults``).
"""
