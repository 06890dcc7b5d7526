"""Ray Serve deployments for stored models (imported lazily; needs only the registry and store)."""
