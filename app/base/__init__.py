"""Below everything: errors and their answers, time, logs, the Prometheus instruments, the database
handle, and who may call. Imports nothing else of the service."""
