"""Edge proxy and durable forwarder for Jitsu's ingest API."""

__version__ = "0.1.0"
