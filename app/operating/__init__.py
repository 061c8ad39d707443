"""Operating the service: the ``flask voice`` commands, the health, metrics and OpenAPI endpoints,
what a metrics scrape reads, and the simulator. Sits above everything but the assembly
(``app.create_app``, ``app.celery_app``)."""
