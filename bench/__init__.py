"""Benchmarks of the product against the truth (accuracy, hand checks, incremental scoring, drift): they
import ml/ and pipelines/, which never import them."""
