"""Studies built on the method: the warm start, paired statistics, and the knowledge-transfer reproduction."""
