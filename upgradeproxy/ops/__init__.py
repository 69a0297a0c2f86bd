"""Operations: Prometheus metrics and the status page, built from the proxy's snapshots."""
