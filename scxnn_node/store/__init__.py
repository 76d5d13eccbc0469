"""Durable state: SQLAlchemy models, the job queue, the spool of received files."""
