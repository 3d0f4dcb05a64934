"""Studies built on the method: the tiny pipeline and demo (`pipeline`), the distillation baselines (`baselines`),
the clean-label reproduction (`reproduce`), the knowledge-transfer study (`transfer`) and our transfer variants
(`variants`), the warm start (`warmstart`), the tiny teacher's training (`teacher`) and paired statistics
(`stats`)."""
