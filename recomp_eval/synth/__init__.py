"""SynthVQA: procedural scenes and questions in the five benchmarks' hub schemas."""
