"""The rollout service: Ray replicas, the router, the gRPC front end, weight updates, metrics."""
