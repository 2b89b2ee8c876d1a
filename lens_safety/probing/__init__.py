"""Where harm is readable in the residual stream: caching, layer probes, directions, the probe
study."""
