"""opd-local: on-policy distillation from a frozen teacher that sees a privileged prompt."""
