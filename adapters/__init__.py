"""Adapter math: canonical form, slot bank and the batched multi-adapter layer. No I/O, no gRPC."""
