"""The embedded lab: private database servers on loopback, a generated proxy config, and `multiproxy lab`."""
