"""The task node detail service: gRPC server, store and legacy JSON shim."""
