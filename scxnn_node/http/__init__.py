"""The node's HTTP port (off by default): Prometheus metrics, a read-only status page, and a
token-guarded retry of dead deliveries. Everything it shows is read from the database at request
time, so it is right with several worker processes and several nodes on one database."""
