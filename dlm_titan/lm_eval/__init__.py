"""lm-evaluation-harness for dlm_titan models: ``python -m dlm_titan.lm_eval`` is lm-eval's own command line
with model ``dlm_titan`` registered (see :mod:`dlm_titan.lm_eval.model`); the scoring itself
(:mod:`dlm_titan.lm_eval.scorer`) needs no lm-eval."""
