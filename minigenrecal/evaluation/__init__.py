"""Evaluation: exact match of greedy answers (`exact_match`), and vocabulary-independent answer distributions with
their JSD, ECE and posterior scores (`metrics`). It reads trained models; it trains nothing."""
