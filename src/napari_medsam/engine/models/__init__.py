"""Model architectures, the registry and checkpoint handling."""
