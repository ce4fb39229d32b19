"""multiproxy: a multi-engine database proxy with transaction pooling, pinning detection and failover."""
__version__ = "0.1.0"
