"""Structured output: what a request's output must match (`Constraint`), its grammar compiled
for a model's tokenizer (`GrammarCompiler`) and a running row's matcher (`RowConstraint`)."""
