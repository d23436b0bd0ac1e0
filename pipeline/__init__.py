"""The driver: config, planning, reading shards, fan-out to actors, writing, resume, CLI, report."""

__version__ = "0.1.0"
