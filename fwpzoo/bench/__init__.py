"""Benchmarks, one module per `fwpzoo bench NAME`; each exposes main(argv) -> exit code."""
