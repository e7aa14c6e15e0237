"""The ext_proc gRPC server, its command line and the Envoy configuration builder."""
